"""Schedules: linear warmup then cosine (lr, weight decay, teacher momentum) per iteration, the teacher
temperature per epoch, and the set of them a run follows (:class:`Schedules`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dino.config import DINOConfig

log = logging.getLogger(__name__)


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start_value: float = 0.0,
) -> np.ndarray:
    """``epochs * iters_per_epoch`` values, those of the original's ``utils.cosine_scheduler``: a linear
    warm-up from ``warmup_start_value`` that reaches ``base_value`` at its last iteration, then a half
    cosine from ``base_value`` towards ``final_value`` over the remaining n iterations, evaluated at
    0 … n-1 of n (so the last value stops one step short of ``final_value``: a teacher momentum schedule
    ends just below 1). A warm-up longer than the run is cut at the run's end (the original refuses it):
    a short trial follows the beginning of the long recipe, at the same slope."""
    total = epochs * iters_per_epoch
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    warmup = np.linspace(warmup_start_value, base_value, warmup_iters)
    steps = np.arange(max(total - warmup_iters, 0))
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))[:total]


def teacher_temperature_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear from ``warmup_temp`` to ``final_temp`` over ``warmup_epochs``,
    then constant. A run shorter than the warm-up follows its beginning (the slope does not depend on the
    run's length, as in the original code)."""
    warmup = np.linspace(warmup_temp, final_temp, warmup_epochs)
    return np.concatenate((warmup, np.full(max(epochs - warmup_epochs, 0), final_temp)))[:epochs]


@dataclass(frozen=True)
class Schedules:
    """Per-iteration lr, weight decay and teacher momentum; per-epoch teacher temperature."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def build(cls, cfg: DINOConfig, iters_per_epoch: int, world_size: int) -> Schedules:
        o, r = cfg.optim, cfg.run
        peak_lr = o.lr * r.batch_size * world_size / 256.0  # linear scaling rule
        schedules = cls(
            lr=cosine_schedule(peak_lr, o.min_lr, r.epochs, iters_per_epoch, o.warmup_epochs),
            weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, r.epochs, iters_per_epoch),
            momentum=cosine_schedule(
                cfg.teacher.momentum, cfg.teacher.final_momentum, r.epochs, iters_per_epoch
            ),
            teacher_temp=teacher_temperature_schedule(
                cfg.loss.warmup_teacher_temp,
                cfg.loss.teacher_temp,
                cfg.loss.warmup_teacher_temp_epochs,
                r.epochs,
            ),
        )
        # Warm-ups as long as the run or longer (short trials of a long recipe) leave no decay; say so.
        if o.warmup_epochs >= r.epochs:
            log.warning(
                "optim.warmup_epochs=%g covers all of run.epochs=%d: the learning rate rises for the whole "
                "run, to %.3g at its end (peak %.3g), and never decays (lower optim.warmup_epochs for a full "
                "warm-up and a decay)",
                o.warmup_epochs, r.epochs, schedules.lr[-1], peak_lr,
            )  # fmt: skip
        if cfg.loss.warmup_teacher_temp_epochs > r.epochs:
            log.warning(
                "loss.warmup_teacher_temp_epochs=%d is longer than run.epochs=%d: the teacher temperature "
                "ends at %.4g, not at loss.teacher_temp=%g (lower the warm-up for a full one)",
                cfg.loss.warmup_teacher_temp_epochs, r.epochs, schedules.teacher_temp[-1],
                cfg.loss.teacher_temp,
            )  # fmt: skip
        return schedules
