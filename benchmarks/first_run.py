"""The first run on a laptop CPU: does the README's first command learn, and by how much?

Trains ``dino train --config cifar_small`` (or ``--config``) on the bundled sample (4,000 CIFAR-10 images)
for each ``--variant`` and ``--seeds``, times it, and scores the teacher with weighted k-NN (k = 20,
T = 0.07; the bank is the 4,000 images the run trained on) against the same network at random init
(the run's own initial weights: ``run.seed``) and against raw pixels, on two held-out sets:

- ``sample-val``: the bundled sample's 1,000 held-out images;
- ``cifar-heldout``: ``--holdout`` images per class of the CIFAR-10 JPEG copy in ``../shared/data`` that
  are in neither split of the sample (skipped, with a note in the JSON, when the tarball is absent).

A variant is ``NAME`` or ``NAME:key=value,key=value`` (dotted config overrides on top of the preset).

    python benchmarks/first_run.py --seeds 0 1 2 --out benchmarks/results/first_run_cpu.json
    python benchmarks/first_run.py --variant base --variant k4096:head.out_dim=4096 --seeds 0
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from _common import CIFAR_TARBALL, benchmark_parser, report

from dino import hub
from dino.config import load_config
from dino.data import sample_dataset
from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.eval.features import extract_features
from dino.eval.knn import knn_accuracy
from dino.train.setup import build_student_teacher, save_backbone


def cifar_heldout(scratch: Path, per_class: int) -> Path | None:
    """``per_class`` images per class of the CIFAR-10 copy that the bundled sample does not hold (drawn
    with a fixed seed), hard-linked into ``scratch``; None without the shared tarball."""
    target = scratch / f"cifar-heldout-{per_class}"
    if (target / "airplane").is_dir():
        return target
    if not CIFAR_TARBALL.is_file():
        return None
    taken = {
        (p.parent.name, p.name) for split in ("train", "val") for p in sample_dataset(split).glob("*/*.jpg")
    }
    with tarfile.open(CIFAR_TARBALL) as tar:  # names first, then one sequential pass (gzip cannot seek)
        names = [m.name for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    by_class: dict[str, list[str]] = {}
    for name in sorted(names):
        key = (Path(name).parent.name, Path(name).name)
        if key not in taken:
            by_class.setdefault(key[0], []).append(name)
    chosen = set()
    for files in by_class.values():
        random.Random(1).shuffle(files)
        chosen.update(files[:per_class])
    with tarfile.open(CIFAR_TARBALL, "r|gz") as stream:
        for member in stream:
            if member.name in chosen:
                data = stream.extractfile(member)
                assert data is not None
                (target / Path(member.name).parent.name).mkdir(parents=True, exist_ok=True)
                (target / Path(member.name).parent.name / Path(member.name).name).write_bytes(data.read())
    return target


def raw_pixels(dataset: ImageFolderDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened normalised pixels (the k-NN then compares them by cosine similarity)."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images).flatten(1), torch.as_tensor(labels)


def knn_top1(bank: tuple, test: tuple) -> float:
    acc = knn_accuracy(bank[0], bank[1], test[0], test[1], ks=(20,), temperature=0.07, num_classes=10)
    return acc[20][0]


def evaluate(weights: Path | None, random_init: bool, sets: dict[str, ImageFolderDataset], bank) -> dict:
    """k-NN top-1 of the backbone in ``weights`` on each held-out set (``bank`` = the training images)."""
    loaded = hub.load(weights, random_init=random_init)
    model = loaded.model
    feats = {name: extract_features(model, ds, torch.device("cpu"), 256, 0) for name, ds in sets.items()}
    bank_f = extract_features(model, bank, torch.device("cpu"), 256, 0)
    return {name: knn_top1(bank_f, f) for name, f in feats.items()}


def run_variant(config: str, name: str, overrides: list[str], seed: int, out: Path) -> dict:
    """Train one variant with one seed; the wall time of the whole command and its log's figures."""
    run_dir = out / f"{name}-s{seed}"
    cmd = [sys.executable, "-m", "dino.cli", "train", "--config", config, "--output", str(run_dir),
           "--no-resume", f"run.seed={seed}", "run.progress_bar=never", *overrides]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start_rec = next(r for r in records if r["type"] == "start")
    done = next(r for r in records if r["type"] == "done")
    train_s = sum(r.get("seconds", 0.0) for r in records if r["type"] == "epoch")
    return {
        "run_dir": str(run_dir),
        "wall_s": wall,
        "train_s": train_s,
        "images_seen": done["iterations"] * start_rec["global_batch_size"],
        "epochs": done["epochs"],
        "images": start_rec["images"],
        "epoch_losses": [r.get("loss") for r in records if r["type"] == "epoch"],
        "monitor_knn": [(r["epoch"], r.get("knn_top1")) for r in records if r["type"] == "knn"],
    }


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--config", default="cifar_small")
    parser.add_argument("--variant", action="append", default=[], help="NAME or NAME:key=value,key=value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--holdout", type=int, default=500, help="CIFAR-10 held-out images per class (0: none)"
    )
    parser.add_argument("--train", type=Path, help="labelled training folder (default: the bundled sample)")
    parser.add_argument("--val", type=Path, help="labelled held-out folder (default: the sample's val split)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dino_first_run"))
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    crop = cfg.data.global_crop_size
    transform = EvalTransform(resize=crop, crop_size=crop, mean=cfg.data.mean, std=cfg.data.std)
    train_dir, val_dir = args.train or sample_dataset("train"), args.val or sample_dataset("val")
    bank = ImageFolderDataset(train_dir, transform, labelled=True)
    sets = {"sample-val": ImageFolderDataset(val_dir, transform, labelled=True)}
    heldout = cifar_heldout(args.scratch, args.holdout) if args.holdout else None
    if heldout is not None:
        sets["cifar-heldout"] = ImageFolderDataset(heldout, transform, labelled=True)
    pixel_bank = raw_pixels(bank)
    pixels = {name: knn_top1(pixel_bank, raw_pixels(ds)) for name, ds in sets.items()}

    variants = args.variant or ["preset"]
    runs, table = [], []
    for spec in variants:
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
        for seed in args.seeds:
            if args.train is not None:  # the monitor's held-out images: the sample's, unless told otherwise
                overrides = [f"data.path={train_dir}", f"monitor.knn_val={val_dir}", *overrides]
            result = run_variant(args.config, name, overrides, seed, args.scratch / "runs")
            weights = Path(result["run_dir"]) / "teacher_backbone.pth"
            torch.manual_seed(seed)
            result["teacher"] = evaluate(weights, False, sets, bank)
            result["random_init"] = _random_init(Path(result["run_dir"]), sets, bank)
            runs.append({"variant": name, "overrides": overrides, "seed": seed, **result})
            table.append(
                {
                    "variant": name,
                    "seed": seed,
                    "images seen": result["images_seen"],
                    "train min": round(result["train_s"] / 60, 2),
                    "wall min": round(result["wall_s"] / 60, 2),
                    **{f"{s} k-NN": result["teacher"][s] for s in sets},
                    **{f"{s} random": result["random_init"][s] for s in sets},
                }
            )
            print(json.dumps(table[-1]), flush=True)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        summary[name] = {
            s: {
                "teacher_mean": statistics.mean(r["teacher"][s] for r in mine),
                "random_init_mean": statistics.mean(r["random_init"][s] for r in mine),
                "gain_min": min(r["teacher"][s] - r["random_init"][s] for r in mine),
                "gain_max": max(r["teacher"][s] - r["random_init"][s] for r in mine),
            }
            for s in sets
        }
    body = {
        "config": args.config,
        "seeds": args.seeds,
        "held_out": {name: len(ds) for name, ds in sets.items()},
        "bank": len(bank),
        "raw_pixels": pixels,
        "summary": summary,
        "runs": runs,
        "note": None
        if heldout is not None or not args.holdout
        else f"{CIFAR_TARBALL} absent: sample-val only",
    }
    report("first_run", torch.device("cpu"), body, table, args.out)


def _random_init(run_dir: Path, sets: dict, bank) -> dict:
    """The run's own initial network: the first checkpoint would be after training, so the network is
    rebuilt from the run's config and seed the way ``dino train`` builds it."""
    cfg = load_config(run_dir / "config.yaml")
    _, teacher = build_student_teacher(cfg, torch.device("cpu"))
    path = run_dir / "random_init_backbone.pth"
    save_backbone(teacher.backbone, path)
    return evaluate(path, False, sets, bank)


if __name__ == "__main__":
    main()
