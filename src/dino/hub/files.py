"""Reading weight files without executing anything.

Every ``.pth`` file is read with ``torch.load(weights_only=True)``, allowing beyond plain data only what the
original code's full checkpoints pickle: ``argparse.Namespace`` (its ``args``) and numpy numbers (its
optimiser's ``lr`` and ``weight_decay``, set from numpy schedules); ``.safetensors`` files cannot carry code
at all. A checkpoint that carries code is refused, never executed.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

from dino.checkpoint import CheckpointError, is_sharded_checkpoint, load_checkpoint
from dino.hub.errors import WeightsError

SAFETENSORS_FORMAT = "dino-backbone"  # metadata "format" of our safetensors exports
SAFETENSORS_FORMAT_VERSION = 1

# Lines of torch's weights-only error text that say nothing about the file itself.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


@cache
def numpy_number_globals() -> tuple[Any, ...]:
    """What unpickling a numpy number needs, for ``torch.serialization.safe_globals``.

    A pickled ``numpy.float64`` is ``scalar(dtype("f8"), raw bytes)``: the ``scalar`` function, the
    ``numpy.dtype`` class, and the class of the dtype (for the dtype's state). ``scalar`` is allowed under
    both of its module paths, ``numpy.core`` (numpy 1, the released checkpoints) and ``numpy._core``
    (numpy 2), whichever numpy is installed. Only the plain numeric dtypes (bool, integers, floats) can be
    built, so an object-dtype scalar, which could hold any object, is still refused; arrays
    (``_reconstruct``) stay refused too.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return ()
    try:  # numpy 2 (numpy 1.26 has it too); numpy.core warns on access there
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - numpy before 1.26
        multiarray = importlib.import_module("numpy.core.multiarray")
    scalar = multiarray.scalar
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqBHILQefd"}
    return (
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *sorted(dtype_classes, key=lambda c: c.__name__),
    )


def read_weights_file(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> Any:
    """Load a ``.pth`` file without executing code (beyond tensors and plain data, only the ``args``
    Namespace and numpy numbers of the original's checkpoints are allowed). ``mmap``: map the tensors
    from the file rather than reading them (for a quick look at a large file; needs torch's zip format,
    read whole otherwise)."""
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):  # a sharded run's checkpoint directory: read whole, in this process
        try:
            return load_checkpoint(path, map_location)
        except CheckpointError as err:
            raise WeightsError(str(err)) from err
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *numpy_number_globals()]):
            return torch.load(
                path,
                map_location=map_location,
                weights_only=True,
                mmap=mmap and zipfile.is_zipfile(path),
            )
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # An unknown function or class (GLOBAL), or an object of a class not allowed (its state "build").
        culprit = next((line for line in lines if "GLOBAL" in line or "Can only build" in line), "")
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
