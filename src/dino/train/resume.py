"""Where a run continues: the checkpoint it resumes from, the point in the data it goes on from, and the
files of the run it replaces, moved out of the way."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dino.checkpoint import CheckpointManager, is_sharded_checkpoint, load_checkpoint, set_aside
from dino.hub import load_training_checkpoint
from dino.train.logger import counted

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    epoch: int = 0
    iteration: int = 0  # global index of the next optimiser step
    step_in_epoch: int = 0  # batches of the current epoch already done
    train_seconds: float = 0.0  # wall time spent training so far, across resumes (run.max_minutes)


def find_checkpoint(
    resume: str | Path | bool, checkpoints: CheckpointManager, device: torch.device, consolidate: bool = True
) -> tuple[dict, Path] | None:
    """The checkpoint ``resume`` names and its path: the newest of the run directory (True), none (False),
    or the file given (ours, or a released full checkpoint of the original code). ``consolidate=False``
    (a sharded run): a sharded checkpoint is checked and described, not read (see
    :func:`dino.checkpoint.load_sharded_checkpoint`)."""
    if resume is False:
        return None
    if resume is True:
        return checkpoints.load_latest(map_location=device, consolidate=consolidate)
    if is_sharded_checkpoint(resume):
        return load_checkpoint(Path(resume), device, consolidate=consolidate), Path(resume)
    return load_training_checkpoint(resume, map_location=device), Path(resume)


def resume_point(checkpoint: dict, iters_per_epoch: int, global_batch: int) -> TrainState:
    """Where a run continues from ``checkpoint`` with the data and batch size it has now.

    The iteration is recomputed as epoch × iterations per epoch + step, so the schedules (built for the
    current data and batch) continue where the epoch is. A checkpoint taken mid-epoch with another
    global batch size (batch size or number of processes changed) continues after as many samples as
    were done (rounded down to whole batches: a few samples come again); one taken at the last step
    of an epoch (or beyond the batches the data gives now) continues with that epoch's end (its k-NN,
    teacher rule and summary), not past it."""
    epoch = int(checkpoint["epoch"])
    step = int(checkpoint.get("step_in_epoch", 0))
    saved_batch = checkpoint.get("global_batch_size")
    if step and saved_batch is not None and int(saved_batch) != global_batch:
        samples = step * int(saved_batch)
        log.warning(
            "the checkpoint is %s of %s into epoch %d; with %s a step now, the epoch goes on from step %d",
            counted(step, "step"), counted(int(saved_batch), "image"), epoch, counted(global_batch, "image"),
            samples // global_batch,
        )  # fmt: skip
        step = samples // global_batch
    if step > iters_per_epoch:
        log.warning(
            "the checkpoint is %s into epoch %d but the data gives %d per epoch now; finishing that epoch",
            counted(step, "step"), epoch, iters_per_epoch,
        )  # fmt: skip
        step = iters_per_epoch
    return TrainState(
        epoch=epoch,
        iteration=epoch * iters_per_epoch + step,
        step_in_epoch=step,
        train_seconds=float(checkpoint.get("train_seconds", 0.0)),
    )


RUN_OUTPUTS = (
    "checkpoints", "log.jsonl", "config.yaml", "teacher_backbone.pth", "curves.png",
    "profile.json", "profile.txt", "profile_trace.json", "tensorboard", "wandb", "wandb_run_id",
)  # fmt: skip


def set_aside_replaced_files(
    run_dir: Path,
    checkpoints: CheckpointManager,
    restored: tuple[dict, Path] | None,
    iteration: int,
    outputs: Sequence[str] = RUN_OUTPUTS,
) -> Path | None:
    """Move out of the way (into ``run_dir/replaced-<time>/``) what the run would otherwise overwrite
    or take for its own: when it continues (at ``iteration``) from one of this directory's checkpoints,
    the rolling checkpoints numbered above where it goes on — later points, or, after a change of batch
    size, the same points numbered for the old length — and the periodic ones of later epochs (the
    rolling window keeps the highest numbers and resuming takes the newest, so the run would lose its
    own files to them); when it starts afresh or from a checkpoint elsewhere, the previous run's files
    (``outputs``: what a run of its kind writes). Nothing is deleted."""
    if restored is not None and _is_in(restored[1], run_dir):
        checkpoint = restored[0]
        saved = int(checkpoint.get("iteration", 0))
        later = checkpoints.newer_than(min(saved, iteration), int(checkpoint["epoch"]))
        return set_aside(run_dir, [p.relative_to(run_dir) for p in later])
    return set_aside(run_dir, outputs)


def _is_in(path: Path, run_dir: Path) -> bool:
    """``path`` is ``run_dir`` itself or one of its checkpoints."""
    path, run_dir = Path(path).resolve(), run_dir.resolve()
    return path == run_dir or path.parent == run_dir / "checkpoints"
