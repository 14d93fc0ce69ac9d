"""Per-iteration schedules: linear warmup then cosine (lr, weight decay, teacher momentum)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start_value: float = 0.0,
) -> np.ndarray:
    """``epochs * iters_per_epoch`` values: linear warmup from ``warmup_start_value`` to ``base_value``
    over ``warmup_epochs``, then a half cosine from ``base_value`` down (or up) to ``final_value``."""
    total = epochs * iters_per_epoch
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    warmup = np.linspace(warmup_start_value, base_value, warmup_iters, endpoint=False)
    steps = np.arange(total - warmup_iters)
    n = max(len(steps) - 1, 1)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / n))
    return np.concatenate((warmup, cosine))


def teacher_temperature_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear from ``warmup_temp`` to ``final_temp`` over ``warmup_epochs``,
    then constant. A run shorter than the warm-up follows its beginning (the slope does not depend on the
    run's length, as in the original code)."""
    warmup = np.linspace(warmup_temp, final_temp, warmup_epochs)
    return np.concatenate((warmup, np.full(max(epochs - warmup_epochs, 0), final_temp)))[:epochs]
