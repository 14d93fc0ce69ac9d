"""Time to accuracy on CIFAR-10 (JPEG copy): train a preset for a wall-clock budget, then weighted k-NN.

Unpacks ``../shared/data/cifar10-train-jpeg.tar.gz`` once into a scratch folder, holds out ``--holdout``
images of every class (drawn with a fixed seed; never trained on), trains ``dino train`` on the rest, and reports the
teacher's weighted k-NN accuracy (k = 20, T = 0.07) on the held-out images, next to the same network at
random initialisation. The k-NN bank is ``--bank`` labelled training images per class (the ``--curve``
monitor's too), and, at the end, also the whole training split, as the paper's k-NN evaluation does.

``--variants ours,plain`` trains the preset as it is and the same recipe the plain way (PIL in loader
workers, fp16, files decoded at every epoch) one after the other, each for ``--epochs`` or for the epochs
its own speed probe fits into ``--minutes`` after the start-up the probe measured (data, compilation; the
``--curve`` monitor passes are not in that estimate); runs go to ``--run-dir`` (or the scratch folder) /
``VARIANT-EPOCHSep``.

    python benchmarks/time_to_accuracy.py --minutes 15 --out results/time_to_accuracy_cpu.json
    python benchmarks/time_to_accuracy.py --config cifar_resnet18 --minutes 8 --curve 5   # GPU
    python benchmarks/time_to_accuracy.py --config cifar_resnet18 --epochs 4 --variants ours,plain
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from _common import CIFAR_TARBALL as TARBALL
from _common import benchmark_parser, pick_device, plain_overrides, report

from dino import hub
from dino.config import load_config
from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.eval.features import extract_features
from dino.eval.knn import knn_accuracy


class Split(NamedTuple):
    """The three folders of a split: train/ (all but the held-out, or the first ``--train-per-class`` of
    them per class), bank/ (a labelled subset of the training images), test/ (held-out)."""

    train: Path
    bank: Path
    test: Path

    def banks(self) -> dict[str, Path]:
        """The k-NN banks every network is evaluated against: the labelled subset and the whole split."""
        return {"bank": self.bank, "train": self.train}


def prepare(scratch: Path, holdout: int, bank: int, train_limit: int = 0) -> Split:
    """The folders of :class:`Split`, as hard links into the unpacked CIFAR-10 copy."""
    source = scratch / "all"
    if not (source / "train").is_dir():
        if not TARBALL.is_file():
            sys.exit(f"{TARBALL} not found: this benchmark needs the project's shared data folder")
        source.mkdir(parents=True, exist_ok=True)
        with tarfile.open(TARBALL) as tar:
            tar.extractall(source, filter="data")
    split = scratch / (f"split-h{holdout}-b{bank}" + (f"-t{train_limit}" if train_limit else ""))
    if not (split / "test").is_dir():
        for class_dir in sorted((source / "train").iterdir()):
            files = sorted(class_dir.iterdir())
            random.Random(0).shuffle(files)
            parts = {
                "test": files[:holdout],
                "train": files[holdout:][: train_limit or None],
                "bank": files[holdout : holdout + bank],
            }
            for name, chosen in parts.items():
                (split / name / class_dir.name).mkdir(parents=True, exist_ok=True)
                for f in chosen:
                    target = split / name / class_dir.name / f.name
                    if not target.exists():
                        os.link(f, target)
    return Split(split / "train", split / "bank", split / "test")


def knn(weights: Path, random_init: bool, banks: dict[str, Path], test: Path, crop: int, mean, std) -> dict:
    """Weighted k-NN (k = 20, T = 0.07) of the held-out images against each labelled bank in ``banks``
    (name -> folder): ``{name: {top1, top5, extract_seconds}}``, the test features extracted once."""
    torch.manual_seed(0)
    loaded = hub.load(weights, random_init=random_init)
    transform = EvalTransform(resize=crop, crop_size=crop, mean=mean, std=std)
    device = pick_device("auto")
    model = loaded.model.to(device)
    workers = min(8, os.cpu_count() or 1)
    start = time.perf_counter()
    test_f, test_y = extract_features(
        model, ImageFolderDataset(test, transform, labelled=True), device, 256, workers
    )
    test_seconds = time.perf_counter() - start
    results = {}
    for name, bank in banks.items():
        start = time.perf_counter()
        bank_f, bank_y = extract_features(
            model, ImageFolderDataset(bank, transform, labelled=True), device, 256, workers
        )
        seconds = time.perf_counter() - start + test_seconds
        acc = knn_accuracy(bank_f, bank_y, test_f, test_y, ks=(20,), temperature=0.07, num_classes=10)[20]
        results[name] = {"top1": acc[0], "top5": acc[1], "extract_seconds": seconds}
    return results


# Side by side with the preset as it is: the same recipe the plain way (see _common.plain_overrides).
VARIANTS = {"ours": lambda gpu: [], "plain": plain_overrides}

PROBE_RECORDS = 8  # log intervals the speed probe waits for (it uses the median of the last 6)


class Probe(NamedTuple):
    images_per_s: float  # the steady training rate
    startup_s: float  # from the command's launch to the rate: imports, data (decoded into memory), compiling


def probe_rate(config: str, train_dir: Path, probe_dir: Path, overrides: list[str], batch: int) -> Probe:
    """Training images/s of ``config`` here — the median of a short run's log intervals after the first two
    (which include the warm-up) — and the start-up time the budget must also hold: the time from launch
    to the last interval used, less its steps at that rate. The run is stopped once it has logged enough.
    (The probe's compiled graphs land in inductor's cache, so the timed run starts a little faster.)"""
    cmd = [sys.executable, "-m", "dino.cli", "train", "--config", config, "--data", str(train_dir),
           "--output", str(probe_dir), "--no-resume", *overrides, "run.epochs=1",
           "run.progress_bar=never", f"run.log_every={max(1, 512 // batch)}"]  # fmt: skip
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = probe_dir / "log.jsonl"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            finished = proc.poll() is not None
            iters = _records(log, "iter")
            if len(iters) >= PROBE_RECORDS or (finished and len(iters) >= 3):
                rates = sorted(r["images_per_s"] for r in iters[2:])
                rate, last = rates[len(rates) // 2], iters[-1]
                steady = (last["iteration"] + 1) * batch / rate
                return Probe(rate, max(0.0, last["time"] - launched - steady))
            epochs = _records(log, "epoch") if finished else []
            if epochs:  # a dataset too small for enough log intervals: its epoch's rate
                epoch = epochs[-1]
                return Probe(epoch["images_per_s"], max(0.0, epoch["time"] - launched - epoch["seconds"]))
            if finished:
                break
            time.sleep(1)
    finally:
        proc.kill()
        proc.wait()
    sys.exit(
        f"could not measure the training speed (the probe run in {probe_dir} failed or logged too little)"
    )


def _records(log: Path, kind: str) -> list[dict]:
    if not log.is_file():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("type") == kind]


def curve(log: Path, wall_start: float) -> list[dict]:
    """The run's k-NN monitor results: epoch, minutes since the training command started, top-1/top-5."""
    return [
        {
            "epoch": r["epoch"] + 1,
            "minutes": (r["time"] - wall_start) / 60,
            "top1": r.get("knn_top1"),
            "top5": r.get("knn_top5"),
        }  # fmt: skip
        for r in _records(log, "knn")
    ]


def training_rate(log: Path) -> float | None:
    """Median images/s of the run's log intervals (the steady rate; warm-up and k-NN pauses are outliers)."""
    rates = sorted(r["images_per_s"] for r in _records(log, "iter") if "images_per_s" in r)
    return rates[len(rates) // 2] if rates else None


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--config", default="cifar_small")
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="training budget; sets run.epochs from a probe"
    )
    parser.add_argument("--epochs", type=int, default=0, help="fixed number of epochs instead of --minutes")
    parser.add_argument("--holdout", type=int, default=500, help="held-out test images per class")
    parser.add_argument("--bank", type=int, default=1000, help="k-NN bank images per class")
    parser.add_argument(
        "--train-per-class", type=int, default=0, help="train on this many images per class (0: all)"
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dino-cifar10"))
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument(
        "--curve",
        type=int,
        default=0,
        help="also evaluate k-NN during training about this many times (the run's k-NN monitor, on the "
        "same bank and held-out images; its time counts in the training minutes)",
    )
    parser.add_argument(
        "--variants",
        default="ours",
        help="comma-separated: ours (the preset as it is) and plain (the same recipe decoding and augmenting "
        "image by image in loader workers with PIL, fp16 on a GPU, nothing kept in memory)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for dino train")
    args = parser.parse_args()

    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.train_per_class and args.bank > args.train_per_class:
        parser.error(
            f"--bank {args.bank} is larger than --train-per-class {args.train_per_class}: the k-NN bank would "
            "hold images the network never trained on; lower --bank"
        )
    split = prepare(args.scratch, args.holdout, args.bank, args.train_per_class)
    cfg = load_config(args.config, args.overrides)
    n_train = sum(1 for _ in split.train.rglob("*.jpg"))
    gpu = pick_device("auto").type == "cuda"
    results = []
    for name in variants:
        overrides = [*args.overrides, *VARIANTS[name](gpu)]
        results.append({"variant": name} | train_and_evaluate(args, name, overrides, n_train, split))
    d = cfg.data
    baseline = knn(
        Path(results[0]["run_dir"]), True, split.banks(), split.test, d.global_crop_size, d.mean, d.std
    )
    body = {
        "dataset": "CIFAR-10 (JPEG copy), train split; held-out = "
        f"{args.holdout}/class never trained on; k-NN banks: bank = {args.bank}/class of the training "
        f"images, train = all {n_train} training images (the paper's protocol)",
        "config": args.config,
        "overrides": args.overrides,
        "train_images": n_train,
        "knn_k20_random_init": baseline["bank"],
        "knn_k20_random_init_train_bank": baseline["train"],
        "results": results,
    }
    table = [{"run": "random init", "k-NN top-1 (k=20)": baseline["bank"]["top1"],
              "bank = training split": baseline["train"]["top1"]}]  # fmt: skip
    for r in results:
        table += [
            {"run": f"{r['variant']}: monitor after epoch {c['epoch']}, {c['minutes']:.1f} min",
             "k-NN top-1 (k=20)": c["top1"]}
            for c in r["knn_curve"]
        ]  # fmt: skip
        table.append(
            {"run": f"{r['variant']}: {args.config}, {r['epochs']} epochs, {r['train_minutes']:.1f} min",
             "k-NN top-1 (k=20)": r["knn_k20_trained"]["top1"],
             "bank = training split": r["knn_k20_trained_train_bank"]["top1"]}
        )  # fmt: skip
    report("time_to_accuracy", pick_device("auto"), body, table, args.out)


def train_and_evaluate(args, name: str, overrides: list[str], n_train: int, split: Split) -> dict:
    """One variant: its epochs (fixed, or from a speed probe for --minutes, ``n_train`` images an epoch),
    the timed training command, then k-NN of its teacher."""
    cfg = load_config(args.config, overrides)
    epochs = args.epochs
    probe = None
    if not epochs:  # images/s of this setup on this machine is not known yet: probe it
        probe_dir = args.scratch / f"probe-{name}"
        probe = probe_rate(args.config, split.train, probe_dir, overrides, cfg.run.batch_size)
        training_s = args.minutes * 60 - probe.startup_s  # the start-up counts in the budget too
        if training_s <= 0:
            sys.exit(
                f"--minutes {args.minutes}: the {name} run's start-up alone took {probe.startup_s:.0f} s in the "
                "probe (data, compilation); give it more minutes"
            )
        epochs = max(1, int(training_s * probe.images_per_s / n_train))
    run_dir = (args.run_dir or args.scratch / f"run-{args.config}") / f"{name}-{epochs}ep"
    monitor = []
    if args.curve:
        every = max(1, round(epochs / args.curve))
        monitor = [
            f"monitor.knn_every={every}",
            f"monitor.knn_train={split.bank}",
            f"monitor.knn_val={split.test}",
        ]
    cmd = [sys.executable, "-m", "dino.cli", "train", "--config", args.config, "--data", str(split.train),
           "--output", str(run_dir), "--no-resume", *monitor, *overrides, f"run.epochs={epochs}",
           "run.progress_bar=never"]  # fmt: skip
    start = time.perf_counter()
    wall_start = time.time()
    subprocess.run(cmd, check=True)
    train_minutes = (time.perf_counter() - start) / 60
    d = cfg.data
    trained = knn(run_dir, False, split.banks(), split.test, d.global_crop_size, d.mean, d.std)
    return {
        "overrides": overrides,
        "epochs": epochs,
        "probe": probe._asdict() if probe is not None else None,
        "run_dir": str(run_dir),
        "train_minutes": train_minutes,
        "knn_k20_trained": trained["bank"],
        "knn_k20_trained_train_bank": trained["train"],
        "knn_curve": curve(run_dir / "log.jsonl", wall_start),
        "images_per_s": training_rate(run_dir / "log.jsonl"),
    }


if __name__ == "__main__":
    main()
