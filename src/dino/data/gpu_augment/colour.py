"""Colour operations on [B, 3, H, W] batches in [0, 1] with per-sample factors: torchvision's tensor
semantics (contrast blends with the mean of the grayscale image, hue rotates in HSV) and PIL's luma."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LUMA_WEIGHTS",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "rgb_to_grayscale",
    "solarize",
]

LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G, B: PIL's ``convert("L")``, used for grayscale, contrast, saturation."""


def _per_sample(factor: Tensor | float, x: Tensor) -> Tensor:
    """A per-sample factor of shape [B] (or a number) shaped to broadcast over [B, C, H, W]."""
    return torch.as_tensor(factor, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


_CONSTANTS: dict[tuple[tuple[float, ...], torch.device, torch.dtype], Tensor] = {}


def _constant(values: tuple[float, ...], like: Tensor) -> Tensor:
    """``values`` as a [len, 1, 1] tensor on ``like``'s device and dtype, made once per device and dtype
    (a copy to a GPU each call would be a host-device transfer per batch)."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype).view(-1, 1, 1).to(like.device)
    return _CONSTANTS[key]


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """ITU-R 601-2 luma of RGB images [..., 3, H, W] in [0, 1], as [..., 1, H, W]."""
    return (images * _constant(LUMA_WEIGHTS, images)).sum(dim=-3, keepdim=True)


def _blend(images: Tensor, other: Tensor, factor: Tensor | float) -> Tensor:
    """``factor * images + (1 - factor) * other`` clipped to [0, 1] (factor 1 returns ``images`` exactly)."""
    f = _per_sample(factor, images)
    return (f * images + (1.0 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor | float) -> Tensor:
    """Scale [B, 3, H, W] images in [0, 1] by a per-sample factor (blend with black), clipped."""
    return (images * _per_sample(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with the mean of its grayscale version (torchvision/PIL contrast)."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend each image with its grayscale version (factor 0: gray, 1: unchanged)."""
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate the hue of [B, 3, H, W] images in [0, 1] by ``shift`` turns (in [-0.5, 0.5]) per sample.

    HSV's hue in sixths of a turn is ``2 c + (x[c + 1] - x[c + 2]) / C`` for the largest channel ``c``
    (R, G, B = 0, 1, 2, indices mod 3; V its value, C the chroma V - min): at ties the candidates agree.
    Adding the shift and converting back with the closed form ``channel_n = V - C * clip(min(k, 4 - k),
    0, 1)``, ``k = (n + 6 H) mod 6`` for n = 5, 3, 1 (R, G, B), gives the rotated image; grays (C = 0)
    are left unchanged. About twenty whole-batch operations, all channels at once where they can be.
    """
    value, largest = images.max(dim=-3)
    chroma = value - images.amin(dim=-3)
    # x[c + 1] - x[c + 2] for every channel c, then the largest channel's; 0 for grays, so any positive
    # divisor leaves them at hue 0 (chroma below 1e-12 changes the result by less than that).
    differences = images.roll(-1, dims=-3) - images.roll(-2, dims=-3)
    sixths = differences.gather(-3, largest.unsqueeze(-3)).squeeze(-3) / chroma.clamp_min(1e-12)
    sixths = sixths + 2 * largest + 6.0 * _per_sample(shift, images)[:, 0]
    k = torch.remainder(_constant((5.0, 3.0, 1.0), images) + sixths.unsqueeze(-3), 6.0)  # R, G, B at once
    return value.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def solarize(images: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above ``threshold``: ``x -> 1 - x``.

    PIL's ``solarize(threshold=128)`` inverts 8-bit values >= 128, i.e. float values that round to
    128/255 or more, which is ``x >= 127.5 / 255 = 0.5``: hence the default.
    """
    return torch.where(images >= threshold, 1.0 - images, images)
