"""``train``: the DINO training entry point, on one CPU, one GPU or many processes.

The run itself lives in :mod:`dino.train.trainer`: :class:`~dino.train.trainer.TrainingStep` is one
iteration of Algorithm 1 of the paper, :class:`~dino.train.trainer.Trainer` its setup, epochs, checkpoint
policy and epoch end. Where a run continues from is :mod:`dino.train.resume`'s.
"""

from __future__ import annotations

from pathlib import Path

from dino.config import DINOConfig
from dino.train.distributed import cleanup, init_distributed
from dino.train.guard import TrainingDiverged as TrainingDiverged  # re-exported: callers catch it here
from dino.train.resume import TrainState as TrainState
from dino.train.resume import resume_point as resume_point
from dino.train.trainer import EXIT_PREEMPTED as EXIT_PREEMPTED
from dino.train.trainer import Preempted as Preempted
from dino.train.trainer import Trainer
from dino.train.trainer import out_of_memory_advice as out_of_memory_advice


def train(cfg: DINOConfig, resume: str | Path | bool = True) -> Path:
    """Train DINO as ``cfg`` says; returns the run directory. ``resume`` is True (continue the run in
    ``run.output_dir`` if it has a checkpoint), False, or the path of a checkpoint to continue from."""
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_minutes)
    try:
        return Trainer(cfg, env, resume).fit()
    finally:
        cleanup()
