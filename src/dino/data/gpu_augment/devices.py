"""Where a batch lives and how small tensors get there without making the host wait."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["device_of", "to_device"]


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without waiting. To a GPU it goes through pinned memory (PyTorch's caching
    host allocator keeps the block until the copy is done), so the copy is queued on the current stream
    and the host goes on; from pageable memory the driver may first wait for that stream."""
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def device_of(images: Sequence[Tensor] | Tensor) -> torch.device:
    """The device of a batch given as one tensor or as a list of tensors (that of the first)."""
    return images.device if isinstance(images, Tensor) else images[0].device
