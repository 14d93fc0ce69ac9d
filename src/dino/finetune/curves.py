"""``curves.png`` of a fine-tuning run, from its ``log.jsonl``: the training loss and learning rate against
images seen, and the held-out top-1/top-5 after every epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dino.train.curves import save_figure


def read_log(run_dir: Path) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    """(images per step, ``iter`` records, ``eval`` records) of the run's log; torn lines skipped."""
    batch, iters, evals = 0, [], []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = record.get("type")
        if kind == "start":
            batch = int(record.get("global_batch_size", batch))
        elif kind == "iter":
            iters.append(record)
        elif kind == "eval":
            evals.append(record)
    return batch, iters, evals


def write_finetune_curves(run_dir: str | Path) -> Path:
    """Draw the three panels into ``run_dir/curves.png`` (atomically) and return its path."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    batch, iters, evals = read_log(run_dir)
    seen = [(r["iteration"] + 1) * max(batch, 1) for r in iters]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    loss_ax, lr_ax, acc_ax = fig.subplots(1, 3)
    loss_ax.plot(seen, [r["loss"] for r in iters], label="training loss (soft targets)")
    lr_ax.plot(seen, [r["lr"] for r in iters], label="base learning rate (head's)")
    epochs = [r["epoch"] + 1 for r in evals]
    acc_ax.plot(epochs, [r["val_top1"] for r in evals], marker="o", label="top-1")
    acc_ax.plot(epochs, [r["val_top5"] for r in evals], marker="s", label="top-5")
    panels = (
        (loss_ax, "training loss", "images seen", "cross-entropy (nats)"),
        (lr_ax, "learning rate", "images seen", "learning rate"),
        (acc_ax, "held-out accuracy", "epoch", "accuracy (%)"),
    )
    for ax, title, x_label, y_label in panels:
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"fine-tuning: {run_dir.name}")
    return save_figure(fig, run_dir / "curves.png")
