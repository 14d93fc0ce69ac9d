"""Fine-tuning transfer: the same network fine-tuned from a DINO run and from random initialisation, under
the same budget, scored on held-out images.

The DINO run (``--dino-run``, default: one trained here with ``dino train --config cifar_small`` on the
bundled sample) gives the starting backbone; the baseline is the same architecture untrained
(``--random-init``, seed ``model.init_seed``). Both arms run ``dino finetune`` with the same preset
(``--preset``, default ``cifar_small_cpu``), epochs, batch and seed on the bundled sample's 4,000 labelled
training images, and are scored on ``--holdout`` images per class of the CIFAR-10 JPEG copy in
``../shared/data`` that are in neither split of the sample (and on the sample's 1,000 held-out images).

    python benchmarks/finetune_transfer.py --epochs 5 --out benchmarks/results/finetune_transfer_cpu.json
    python benchmarks/finetune_transfer.py --dino-run runs/sample --preset cifar_small_cpu run.device=cuda
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import benchmark_parser, report, save_partial
from first_run import cifar_heldout

from dino.data import sample_dataset
from dino.data.datasets import ImageFolderDataset, collate_skipping_bad
from dino.finetune.config import load_finetune_config
from dino.finetune.evaluate import evaluate_classifier
from dino.finetune.trainer import FinetuneTrainer
from dino.train.distributed import init_distributed


def dino_run(scratch: Path, given: Path | None) -> Path:
    """The DINO run to start from: ``given``, or ``dino train --config cifar_small`` trained into
    ``scratch/dino-run`` (about 5 minutes on 2 quiet cores; kept for the next call)."""
    if given is not None:
        return given
    run = scratch / "dino-run"
    if not (run / "teacher_backbone.pth").is_file():
        command = [sys.executable, "-m", "dino.cli", "train", "--config", "cifar_small", "--output", str(run),
                   "run.progress_bar=never"]  # fmt: skip
        subprocess.run(command, check=True)
    return run


def arm(
    name: str, weights: Path, random_init: bool, args, overrides: list[str], heldout: Path
) -> tuple[dict, torch.device]:
    """One fine-tuning run, timed, its accuracy on both held-out sets, and the device it ran on."""
    out = args.scratch / f"finetune-{name}"
    cfg = load_finetune_config(
        args.preset,
        [
            f"model.weights={weights}",
            f"model.random_init={str(random_init).lower()}",
            f"data.train={sample_dataset('train')}",
            f"data.val={heldout}",
            f"run.output_dir={out}",
            f"run.epochs={args.epochs}",
            f"run.seed={args.seed}",
            "run.progress_bar=never",
            *overrides,
        ],
    )
    env = init_distributed(cfg.run.device)
    start = time.perf_counter()
    trainer = FinetuneTrainer(cfg, env, resume=False)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    sample_val = ImageFolderDataset(sample_dataset("val"), transform=trainer.data.val.transform)
    loader = torch.utils.data.DataLoader(sample_val, batch_size=256, collate_fn=collate_skipping_bad)
    on_sample = evaluate_classifier(trainer.model, loader, sample_val.classes, env.device)
    per_epoch = [
        json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"type": "eval"' in line
    ]
    row = {
        "arm": name,
        "start": "random init" if random_init else str(weights),
        "epochs": cfg.run.epochs,
        "images_seen": cfg.run.epochs * trainer.data.iters_per_epoch * cfg.run.batch_size,
        "seconds": seconds,
        "cifar_heldout_top1": result.top1,
        "cifar_heldout_top5": result.top5,
        "cifar_heldout_images": result.images,
        "sample_val_top1": on_sample.top1,
        "per_epoch_heldout_top1": [round(r["val_top1"], 2) for r in per_epoch],
        "per_class_heldout_top1": result.per_class,
        "run_dir": str(out),
    }
    return row, env.device


def main() -> None:
    parser = benchmark_parser(__doc__, device=False)
    parser.add_argument("--dino-run", type=Path, help="DINO run (or backbone file) to start from")
    parser.add_argument("--preset", default="cifar_small_cpu", help="fine-tuning preset or YAML file")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of each arm (the budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=int, default=100, help="held-out CIFAR-10 images per class")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dino_finetune_transfer"))
    parser.add_argument("--load", default="", help="what else ran on the machine (recorded in the JSON)")
    parser.add_argument(
        "overrides", nargs="*", help="fine-tuning overrides for both arms (run.device=cuda …)"
    )
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    heldout = cifar_heldout(args.scratch, args.holdout)
    if heldout is None:
        sys.exit("the CIFAR-10 tarball is missing: set DINO_SHARED_DATA to the folder holding it")
    run = dino_run(args.scratch, args.dino_run)
    weights = run / "teacher_backbone.pth" if run.is_dir() else run
    body: dict = {"preset": args.preset, "overrides": args.overrides, "load": args.load, "arms": []}
    device = torch.device("cpu")
    for name, random_init in (("dino", False), ("random_init", True)):
        row, device = arm(name, weights, random_init, args, args.overrides, heldout)
        body["arms"].append(row)
        save_partial("finetune_transfer", device, body, args.out)
    a, b = body["arms"]
    body["gain_top1_points"] = a["cifar_heldout_top1"] - b["cifar_heldout_top1"]
    table = [{k: r[k] for k in ("arm", "epochs", "images_seen", "seconds", "cifar_heldout_top1",
                                "cifar_heldout_top5", "sample_val_top1")} for r in body["arms"]]  # fmt: skip
    report("finetune_transfer", device, body, table, args.out)


if __name__ == "__main__":
    main()
