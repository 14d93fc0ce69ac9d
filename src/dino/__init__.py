"""DINO: self-distillation with no labels.

``dino.load(name_or_path)`` gives a backbone ready to use; the rest lives in the sub-packages
(:mod:`dino.hub`, :mod:`dino.train`, :mod:`dino.eval`, :mod:`dino.models`…).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load(name_or_path: str | Path, **options: Any) -> nn.Module:
    """The backbone of a released name (``dino_vits16``…), a weights file, a checkpoint or a run directory,
    as an ``nn.Module`` in eval mode with ``arch``, ``patch_size``, ``embed_dim``, ``img_size``, ``depth``
    and ``source`` attributes. ``options`` are :func:`dino.hub.load`'s (``which``, ``img_size``,
    ``download``, ``device``…)."""
    from dino.hub.torchhub import load_model  # torch is imported on first use, not by ``import dino``

    return load_model(name_or_path, **options)
