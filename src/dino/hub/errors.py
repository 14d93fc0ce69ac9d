"""What every part of :mod:`dino.hub` shares: its error, the teacher/student choice, short key lists."""

from __future__ import annotations

from typing import Literal

Which = Literal["teacher", "student"]


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to do."""


def short_list(items: list[str], n: int = 6) -> str:
    """The first ``n`` of ``items`` joined by commas, and how many more there are: ``a, b (+3 more)``."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
