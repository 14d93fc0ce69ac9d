"""Where a computation runs and in which precision, named the same way by ``dino train`` and the evaluations.

A device is ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (``run.device``, ``--device``); a precision is
``auto``, ``fp32``, ``bf16`` or ``fp16`` (``run.precision``; ``--precision`` of feature extraction offers all
but fp16, which needs the gradient scaler of training). :func:`resolve_device` and :func:`resolve_precision`
turn the names into what the hardware at hand can run, or say why it cannot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch

DEVICE_NAMES = "auto, cpu, mps, cuda or cuda:N"
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[PrecisionName, ...] = get_args(PrecisionName)
FEATURE_PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEVICE_NAMES` (``cuda:N`` for any N)."""
    return _DEVICE_NAME.fullmatch(name) is not None


def resolve_device(
    name: str | torch.device, local_rank: int = 0, world_size: int = 1, setting: str = "run.device"
) -> torch.device:
    """``auto`` → the local CUDA device when there is one, else the CPU; ``cuda`` → this process's GPU.

    Under torchrun each process takes GPU ``LOCAL_RANK``, or GPU 0 where the launcher shows every process
    only its own GPU; a fixed ``cuda:N`` would put every process on one GPU, so it is refused there.
    ``setting`` names where ``name`` came from (``run.device``, ``--device``) in the errors."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{setting}={name} but no CUDA device is visible; use {setting}=cpu")
    if name == "cuda":
        count = torch.cuda.device_count()
        if count == 1:
            index = 0
        elif local_rank < count:
            index = local_rank
        else:
            raise ValueError(
                f"process LOCAL_RANK={local_rank} but this node shows {count} GPUs: start at most {count} "
                "processes per node (torchrun --nproc_per_node)"
            )
        name = f"cuda:{index}"
    elif name.startswith("cuda:") and world_size > 1:
        raise ValueError(
            f"{setting}={name} would put all {world_size} processes on one GPU: use {setting}=cuda (each "
            "process takes its LOCAL_RANK's GPU) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """A resolved training precision: its name and the autocast dtype (None: full precision)."""

    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None

    @property
    def autocast(self) -> bool:
        return self.autocast_dtype is not None

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Training: ``auto`` → bf16 on GPUs that support it, fp32 elsewhere. fp16 uses a gradient scaler."""
    if requested == "auto":
        requested = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp32":
        return Precision("fp32", None)
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                "run.precision=bf16 but this GPU has no bf16 support; use run.precision=fp16 or fp32"
            )
        return Precision("bf16", torch.bfloat16)
    if requested == "fp16":
        if device.type == "cpu":
            raise ValueError("run.precision=fp16 needs a GPU; on the CPU use fp32 (or bf16)")
        return Precision("fp16", torch.float16)
    raise ValueError(f"run.precision must be auto, fp32, bf16 or fp16, got {requested!r}")


def autocast_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Feature extraction: the autocast dtype, bfloat16 on CUDA for ``auto`` (fast, no overflow), None
    (full precision) for ``fp32`` and on other devices; ``bf16`` asks for it anywhere."""
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"precision must be one of {FEATURE_PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
