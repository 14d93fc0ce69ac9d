"""What every part of :mod:`dino.hub` shares: its error, the teacher/student choice, short key lists."""

from __future__ import annotations

from typing import Literal

Which = Literal["teacher", "student"]


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to do."""


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
