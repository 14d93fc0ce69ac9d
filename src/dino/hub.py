"""Loading backbone weights safely from our runs, our exports and the released DINO files.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint that carries code is refused, never
executed. Keys are normalised (``module.`` / ``backbone.`` prefixes, the ``teacher``/``student`` entry of a
full checkpoint) and loaded strictly; a mismatch is an error that names the keys and the likely cause.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Which = Literal["teacher", "student"]


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to do."""


def read_weights_file(path: str | Path) -> Any:
    """Load a ``.pth`` file without executing code (``argparse.Namespace`` is the one object allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refused to load {path}: it contains Python objects other than tensors and plain data "
            f"({str(err).splitlines()[0]}); only load files you trust, and re-save them as plain state dicts"
        ) from err
    except Exception as err:
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(err).__name__}: {err})"
        ) from err


def backbone_state_dict(obj: Any, which: Which = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors from a backbone-only state dict or a full training checkpoint."""
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        raise WeightsError(f"this checkpoint has no {which!r} entry; pick the other with which=…")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            "the file holds no state dict of tensors (neither a backbone nor a training checkpoint)"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_weights(model: nn.Module, path: str | Path, which: Which = "teacher") -> None:
    """Load backbone weights from ``path`` into ``model`` strictly, with an actionable error on mismatch."""
    state = backbone_state_dict(read_weights_file(path), which)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    load_strict(model, state, str(path))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state, strict=True)
        return
    hints = []
    if any(k.startswith(("pos_embed", "patch_embed")) for k in (w.split(":")[0] for w in wrong_shape)):
        hints.append("the patch size or image size differs from the file's (e.g. vit_small/16 vs /8)")
    if wrong_shape:
        hints.append("the architecture differs (tiny/small/base/large or resnet depth)")
    if any(k.startswith(("head.", "last_layer", "mlp.")) for k in unexpected):
        hints.append("the file is a full model with its projection head; load the backbone only")
    if missing and not unexpected and not wrong_shape:
        hints.append("the file is incomplete or for another architecture")
    raise WeightsError(
        f"weights in {origin} do not match the model: "
        + "; ".join(
            part
            for part in (
                f"missing {_short(missing)}" if missing else "",
                f"unexpected {_short(unexpected)}" if unexpected else "",
                f"shape mismatch {_short(wrong_shape)}" if wrong_shape else "",
            )
            if part
        )
        + (f". Likely cause: {' or '.join(hints)}" if hints else "")
    )


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
