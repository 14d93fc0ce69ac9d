"""Random-resized-crop boxes for a whole batch: torchvision's ``RandomResizedCrop.get_params``, vectorised."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dino.data.multicrop_spec import check_scale

__all__ = ["CROP_RATIO", "CropBoxes", "draw_crop_boxes", "sample_crop_boxes"]

CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
"""The range of crop aspect ratios (width / height) DINO's random-resized crops draw from."""


class CropBoxes(NamedTuple):
    """Per-sample crop rectangles in pixels (long tensors of shape [B])."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> CropBoxes:
    """Draw one random-resized-crop box per image, exactly as ``RandomResizedCrop.get_params`` does.

    For each image: up to ``attempts`` tries of an area fraction ~ U(scale) and a log-uniform aspect ratio
    in ``ratio``, rounded to whole pixels; the first try that fits is placed uniformly at random; when none
    fits, the centred crop of the whole image clamped to the ratio range is used. All tries are drawn for
    the whole batch at once (the unused ones are simply ignored, which leaves the distribution unchanged).

    Args:
        heights, widths: image sizes in pixels, integer tensors of shape [B] on the target device.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        generator: random generator on the device of ``heights`` (None: that device's global one).
    """
    if heights.shape != widths.shape or heights.dim() != 1:
        raise ValueError(
            f"heights and widths must be 1-D tensors of the same length, got {tuple(heights.shape)} "
            f"and {tuple(widths.shape)}"
        )
    lo, hi = check_scale("scale", scale)
    r_lo, r_hi = (float(r) for r in ratio)
    if not 0.0 < r_lo <= r_hi:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio!r}")
    return draw_crop_boxes(heights, widths, lo, hi, (r_lo, r_hi), generator, attempts)


def draw_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    lo: Tensor | float,
    hi: Tensor | float,
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    attempts: int,
) -> CropBoxes:
    """:func:`sample_crop_boxes` on checked arguments; the area bounds ``lo``, ``hi`` are numbers or
    per-image float64 tensors [B] (views of different scale ranges drawn in one go)."""
    r_lo, r_hi = ratio
    device = heights.device
    h_img = heights.to(torch.float64)
    w_img = widths.to(torch.float64)
    n = h_img.numel()

    draws = torch.rand(n, attempts, 2, generator=generator, device=device, dtype=torch.float64)
    if isinstance(lo, Tensor):
        lo = lo[:, None]
    if isinstance(hi, Tensor):
        hi = hi[:, None]
    target_area = (h_img * w_img)[:, None] * (lo + (hi - lo) * draws[..., 0])
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= w_img[:, None]) & (h > 0) & (h <= h_img[:, None])
    found = fits.any(dim=1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    w_found, h_found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]

    # Fallback: the whole image, cut down to the nearest allowed aspect ratio, centred.
    in_ratio = w_img / h_img
    too_tall, too_wide = in_ratio < min(r_lo, r_hi), in_ratio > max(r_lo, r_hi)
    w_fallback = torch.where(too_wide, torch.round(h_img * max(r_lo, r_hi)), w_img)
    h_fallback = torch.where(too_tall, torch.round(w_img / min(r_lo, r_hi)), h_img)

    crop_h = torch.where(found, h_found, h_fallback)
    crop_w = torch.where(found, w_found, w_fallback)
    position = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    room_h, room_w = h_img - crop_h, w_img - crop_w
    top = torch.where(found, torch.minimum(torch.floor(position[:, 0] * (room_h + 1)), room_h), room_h // 2)
    left = torch.where(found, torch.minimum(torch.floor(position[:, 1] * (room_w + 1)), room_w), room_w // 2)
    return CropBoxes(top.long(), left.long(), crop_h.long(), crop_w.long())
