"""Locate the small CIFAR-10 sample dataset bundled with the package (see ``sample/README.md``)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLE_SPLITS: tuple[str, ...] = ("train", "val")


def sample_dataset(split: str = "train") -> Path:
    """Return the folder of the bundled CIFAR-10 (JPEG copy) sample split, in ImageFolder layout.

    ``"train"`` holds 400 images per class (4,000), ``"val"`` 100 per class (1,000), disjoint; both
    are drawn from the CIFAR-10 training set. The path can be passed straight to
    :class:`dino.data.ImageFolderDataset`.
    """
    if split not in SAMPLE_SPLITS:
        raise ValueError(f"unknown sample split {split!r}; use one of {', '.join(SAMPLE_SPLITS)}")
    resource = files("dino.data") / "sample" / "cifar10" / split
    path = Path(str(resource))
    if not path.is_dir():
        raise FileNotFoundError(
            f"the bundled sample dataset is missing at {path}; reinstall dino from a source tree that "
            "includes src/dino/data/sample (or run scripts/make_sample_dataset.py)"
        )
    return path
