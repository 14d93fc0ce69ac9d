"""Regenerate the bundled CIFAR-10 sample dataset shipped in ``src/dino/data/sample/cifar10``.

The sample lets the package train and evaluate out of the box without a download. It is drawn from
the CIFAR-10 (JPEG copy) training tarball: for each class the file names are sorted, shuffled with a
fixed seed, and the first ``--train-per-class`` go to ``train/`` and the next ``--val-per-class`` to
``val/`` (disjoint). Files are copied byte-for-byte from the tarball, never re-encoded. The tarball is
read in place, so nothing is unpacked into the repository.

Usage::

    python scripts/make_sample_dataset.py /path/to/cifar10-train-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import random
import shutil
import tarfile
from pathlib import Path, PurePosixPath

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "dino" / "data" / "sample" / "cifar10"


def read_class_files(tarball: Path) -> dict[str, dict[str, bytes]]:
    """Read every ``train/<class>/<name>.jpg`` member of the tarball into memory, grouped by class."""
    by_class: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] != "train":
                continue
            if not parts[2].lower().endswith(".jpg"):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            by_class.setdefault(parts[1], {})[parts[2]] = handle.read()
    return by_class


def choose_split(names: list[str], train_n: int, val_n: int, seed: int) -> tuple[list[str], list[str]]:
    """Deterministically pick disjoint train/val file names: sort, shuffle with ``seed``, slice."""
    if train_n + val_n > len(names):
        raise ValueError(f"need {train_n + val_n} files per class but a class has only {len(names)}")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return sorted(order[:train_n]), sorted(order[train_n : train_n + val_n])


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and write the sample dataset (replacing any previous copy)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "tarball", type=Path, help="cifar10-train-jpeg.tar.gz (ImageFolder layout train/<class>/)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's)"
    )
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    by_class = read_class_files(args.tarball)
    if not by_class:
        raise SystemExit(
            f"no train/<class>/*.jpg files found in {args.tarball}; is it the CIFAR-10 JPEG tarball?"
        )
    for split in ("train", "val"):
        shutil.rmtree(args.out / split, ignore_errors=True)
    for cls in sorted(by_class):
        files = by_class[cls]
        train, val = choose_split(list(files), args.train_per_class, args.val_per_class, args.seed)
        for split, chosen in (("train", train), ("val", val)):
            folder = args.out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for name in chosen:
                (folder / name).write_bytes(files[name])
    total = len(by_class) * (args.train_per_class + args.val_per_class)
    print(f"wrote {total} images in {len(by_class)} classes to {args.out}")


if __name__ == "__main__":
    main()
