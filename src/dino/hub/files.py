"""Reading weight files without executing anything.

Every ``.pth`` file is read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the
released full checkpoints pickle, is the one class allowed); ``.safetensors`` files cannot carry code at all.
A checkpoint that carries code is refused, never executed.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from dino.hub.errors import WeightsError

SAFETENSORS_FORMAT = "dino-backbone"  # metadata "format" of our safetensors exports
SAFETENSORS_FORMAT_VERSION = 1

# Lines of torch's weights-only error text that say nothing about the file itself.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def read_weights_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``.pth`` file without executing code (``argparse.Namespace`` is the one object allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line), "")
        if culprit:
            raise WeightsError(
                f"refused to load {path}: it holds Python objects or code, not just tensors and plain data "
                f"({culprit}); nothing in it was run. Only if you trust its origin, re-save its tensors as a "
                "plain state dict"
            ) from err
        detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), type(err).__name__)
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({detail}); it is damaged or not a weights file "
            "(nothing in it was run)"
        ) from err
    except Exception as err:
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(err).__name__}: {err})"
        ) from err


def is_safetensors(path: Path) -> bool:
    """True for a safetensors file (by suffix, or by its JSON header for files named otherwise)."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[:2] != b"PK" and head[8:9] == b"{"


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (the format cannot carry code)."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise WeightsError(f"{path} is a safetensors file: pip install 'dino[safetensors]'") from err
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as err:
        raise WeightsError(f"cannot read {path} as safetensors ({type(err).__name__}: {err})") from err
