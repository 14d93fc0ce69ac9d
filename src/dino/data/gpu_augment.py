"""DINO's multi-crop augmentation on batched tensors, with per-sample random parameters (CPU or GPU).

:class:`BatchMultiCrop` is the tensor twin of :class:`dino.data.transforms.MultiCropAugmentation`: it
takes a whole batch of decoded uint8 images (on the GPU, straight from the decoder) and returns the same
``[global_1, global_2, local_1, ..., local_n]`` list of normalised batches that
:func:`~dino.data.datasets.collate_skipping_bad` builds from the CPU pipeline, so the training loop can use
either. Every random parameter is drawn per sample from the distribution the CPU pipeline draws it from,
on the generator's device: the data path draws on the CPU, so a GPU batch only receives the parameters
(a few host-to-device copies) and runs the pixel work; nothing is read back from the device.

How each step matches the PIL/torchvision reference, and where it deliberately differs:

* Random-resized crop: :func:`sample_crop_boxes` is torchvision's ``RandomResizedCrop.get_params`` (ten
  attempts, then a centred crop clamped to the ratio range), run for the whole batch at once.
* Crop + bicubic resize + flip are one separable resampling ``W_y · image · W_xᵀ`` with per-sample
  matrices holding PIL's antialiased bicubic weights (a = -0.5, support widened by the downscale factor,
  renormalised at the crop border); a flip reverses the rows of ``W_x``. Two batched matmuls do the pixel
  work for any mix of image sizes (images are zero-padded to a common size; the weights never reach the
  padding). The horizontal pass runs first and is clipped to [0, 1] before the vertical one, as in PIL's
  resampler (which also rounds to 8 bits in between; for some shapes the installed Pillow runs the
  vertical pass first, which changes only pixels where the intermediate clips: high-contrast edges).
* Colour jitter, grayscale and solarize follow torchvision's tensor semantics (contrast blends with the
  mean of the grayscale image, hue rotates in HSV), with the ITU-R 601-2 luma weights PIL uses. The four
  jitter operations run in a random order per sample.
* Gaussian blur with per-sample sigma is PIL's own approximation (what the CPU pipeline's
  ``ImageFilter.GaussianBlur(radius=sigma)`` computes): three extended box blurs per direction whose
  combined variance is sigma², edge pixels repeated at the border. A sampled Gaussian would blur visibly
  less than PIL for small sigma (at sigma 0.3 its taps at +-1 weigh 0.4 % instead of PIL's 4.5 %).
  :func:`gaussian_blur` (torchvision's sampled kernel) is kept for comparison.
* Everything is computed in float32 without PIL's rounding to 8 bits after each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from dino.data.transforms import check_channels as _check_channels
from dino.data.transforms import check_probabilities as _check_probabilities
from dino.data.transforms import check_scale as _check_scale
from dino.data.transforms import check_size as _check_size

__all__ = [
    "LUMA_WEIGHTS",
    "BatchMultiCrop",
    "CropBoxes",
    "ViewParameters",
    "ViewRecipe",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "box_blur_reach",
    "extended_box_kernels",
    "gaussian_blur",
    "gaussian_kernels",
    "pil_gaussian_blur",
    "resampling_matrices",
    "resized_crop_runs",
    "resized_crops",
    "rgb_to_grayscale",
    "same_size_runs",
    "sample_crop_boxes",
    "separable_filter",
    "solarize",
    "to_device",
]

LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G, B: PIL's ``convert("L")``, used for grayscale, contrast, saturation."""

_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
_BICUBIC_A = -0.5  # PIL's bicubic kernel parameter (torch's non-antialiased bicubic uses -0.75)


# --------------------------------------------------------------------------------------------- crop boxes


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
    ratio: tuple[float, float] = _RATIO,
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
    lo, hi = _check_scale("scale", scale)
    r_lo, r_hi = (float(r) for r in ratio)
    if not 0.0 < r_lo <= r_hi:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio!r}")
    return _draw_crop_boxes(heights, widths, lo, hi, (r_lo, r_hi), generator, attempts)


def _draw_crop_boxes(
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
        lo, hi = lo[:, None], hi[:, None]
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


# ------------------------------------------------------------------------------------ crop + resize + flip


def _bicubic(x: Tensor) -> Tensor:
    """PIL's bicubic convolution kernel (a = -0.5), support [-2, 2]."""
    a = _BICUBIC_A
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resampling_matrices(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    flip: Tensor | None = None,
    *,
    gain: float = 1.0,
) -> Tensor:
    """Per-sample 1-D resampling weights of shape [B, out_size, in_size] (float32).

    Row ``o`` of sample ``b`` holds the weights with which input pixels ``start[b] .. start[b] +
    length[b] - 1`` make output pixel ``o``: PIL's antialiased bicubic filter, its support stretched by
    the downscale factor, cut at the crop border and renormalised there (PIL crops before resizing, so
    pixels outside the crop never contribute). With ``flip[b]`` true the output order is reversed. The
    rows sum to ``gain`` (e.g. 1/255 to resample 8-bit values into [0, 1]).

    Only a band of ``taps`` input pixels per row can be non-zero (the kernel's support, at most 4 × the
    largest downscale factor wide): the weights are computed on that band and scattered into the zeroed
    rows, so the arithmetic does not scale with ``in_size``. Each row's band is a window of consecutive
    pixels inside the image, shifted inwards at the borders (its pixels outside the crop weigh 0), so its
    positions are distinct and the scatter has a single value for each.
    """
    return _resampling_rows(start, length, in_size, out_size, flip, _taps(in_size, out_size), gain)


def _taps(in_size: int, out_size: int) -> int:
    """Band width that covers any resampling row's support from ``in_size`` input pixels to ``out_size``:
    a crop is never longer than the image, so 4 * stretch + 1 pixels cover it; 2 spare."""
    return min(in_size, math.floor(4.0 * max(in_size / out_size, 1.0)) + 3)


def _resampling_rows(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    flip: Tensor | None,
    taps: int,
    gain: float | Tensor,
) -> Tensor:
    """The work of :func:`resampling_matrices` for rows whose inputs may be shorter than ``in_size`` (the
    matrices' width; e.g. the vertical rows of a crop next to its horizontal ones): ``taps`` must cover
    every row's support and be at most ``in_size``; ``gain`` is a number or one value per row."""
    device = start.device
    crop_len = length.to(torch.float32)
    step = crop_len / out_size  # input pixels per output pixel
    stretch = step.clamp(min=1.0)  # widen the kernel when downscaling (antialiasing)
    centre = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5)[None, :] * step[:, None]
    # The window of each row starts one pixel before its support, clamped into [0, in_size - taps]: its
    # positions are then distinct and inside the matrix; those outside the row's crop weigh 0.
    before = torch.floor(centre - 2.0 * stretch[:, None] - 0.5) + start[:, None]
    first = before.clamp(0, in_size - taps)  # [B, out], absolute pixel index (float, whole)
    pixel = first[..., None] + torch.arange(taps, device=device, dtype=torch.float32)  # [B, out, taps]
    offset = pixel - start[:, None, None].to(torch.float32)  # position within the crop
    distance = (offset + 0.5 - centre[..., None]) / stretch[:, None, None]
    inside = (offset >= 0) & (offset < crop_len[:, None, None])
    weights = _bicubic(distance) * inside
    if isinstance(gain, Tensor):
        gain = gain[:, None, None]
    weights = weights * (gain / weights.sum(dim=-1, keepdim=True))
    index = pixel.long()
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
        index = torch.where(flip[:, None, None], index.flip(1), index)
    rows = torch.zeros(weights.shape[0], out_size, in_size, device=device, dtype=torch.float32)
    batch = torch.arange(weights.shape[0], device=device)[:, None, None]
    output = torch.arange(out_size, device=device)[None, :, None]
    # index_put (not scatter): deterministic on CUDA under torch.use_deterministic_algorithms as well
    return rows.index_put_((batch, output, index), weights)


def _chunks_by_size(shapes: Sequence[tuple[int, int]], max_pixels: int) -> list[list[int]]:
    """Group image indices (largest first) so that each group, zero-padded to its largest height and
    width, holds at most ``max_pixels`` pixels (a group always holds at least one image)."""
    # Largest first; images of the same shape next to each other (one copy per shape in _as_padded_batch).
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], shapes[i]), reverse=True)
    groups: list[list[int]] = []
    current: list[int] = []
    max_h = max_w = 0
    for i in order:
        h, w = shapes[i]
        new_h, new_w = max(max_h, h), max(max_w, w)
        if current and (len(current) + 1) * new_h * new_w > max_pixels:
            groups.append(current)
            current, new_h, new_w = [], h, w
        current.append(i)
        max_h, max_w = new_h, new_w
    if current:
        groups.append(current)
    return groups


def _as_padded_batch(images: Sequence[Tensor], indices: Sequence[int]) -> Tensor:
    """Stack the chosen [3, H, W] images into one zero-padded [n, 3, H_max, W_max] tensor: data movement
    only, one stack and one copy per run of consecutive same-shape images (a single stack when they all
    have one shape), not a copy per image."""
    chosen = [images[i] for i in indices]
    runs = same_size_runs([tuple(img.shape) for img in chosen])
    if len(runs) == 1:
        return torch.stack(chosen)
    height = max(img.shape[-2] for img in chosen)
    width = max(img.shape[-1] for img in chosen)
    first = chosen[0]
    batch = torch.zeros(len(chosen), 3, height, width, dtype=first.dtype, device=first.device)
    for a, b in runs:
        h, w = chosen[a].shape[-2:]
        batch[a:b, :, :h, :w] = chosen[a] if b - a == 1 else torch.stack(chosen[a:b])
    return batch


def same_size_runs(keys: Sequence[object], longest: int | None = None) -> list[tuple[int, int]]:
    """Index ranges ``[start, end)`` of consecutive equal ``keys`` (e.g. the output sizes of the views),
    each at most ``longest`` long (None: no limit)."""
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key and (longest is None or i - runs[-1][0] < longest):
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def resized_crops(
    images: Sequence[Tensor] | Tensor,
    boxes: Sequence[CropBoxes],
    sizes: Sequence[int],
    flips: Sequence[Tensor | None],
    max_pixels_per_chunk: int = 2**26,
) -> list[Tensor]:
    """Cut every crop box out of its image, resize it bicubically to ``size × size`` and flip it.

    ``images`` are uint8 (or [0, 255] float) RGB images [3, H, W] of any sizes, or one [B, 3, H, W]
    batch; ``boxes[v]``, ``sizes[v]`` and ``flips[v]`` describe view ``v`` for all B images. Returns one
    float32 [B, 3, size, size] batch per view with values in [0, 1] (see :func:`resized_crop_runs`).
    """
    runs = resized_crop_runs(images, boxes, sizes, flips, max_pixels_per_chunk, views_per_run=1)
    return [view for run in runs for view in run.unbind(0)]


def resized_crop_runs(
    images: Sequence[Tensor] | Tensor,
    boxes: Sequence[CropBoxes],
    sizes: Sequence[int],
    flips: Sequence[Tensor | None],
    max_pixels_per_chunk: int = 2**26,
    views_per_run: int | None = None,
) -> list[Tensor]:
    """:func:`resized_crops` with the views of each run of equal sizes (:func:`same_size_runs`, at most
    ``views_per_run`` views per run) stacked: one float32 [views, B, 3, size, size] tensor per run.

    The images are processed in chunks of similar size holding at most ``max_pixels_per_chunk`` padded
    pixels, which bounds memory when a batch mixes small and huge images. Within a chunk the views of a
    run share one horizontal and one vertical matmul, so the number of kernels does not grow with the
    number of views.
    """
    runs = same_size_runs(sizes, views_per_run)
    joined = []
    for a, b in runs:
        flip = [
            torch.zeros_like(boxes[v].top, dtype=torch.bool) if flips[v] is None else flips[v]
            for v in range(a, b)
        ]
        run_boxes = CropBoxes(*(torch.cat(field) for field in zip(*boxes[a:b], strict=True)))
        joined.append(_crop_run(sizes[a], b - a, run_boxes, torch.cat(flip)))
    return _render_crop_runs(images, joined, max_pixels_per_chunk)


class _CropRun(NamedTuple):
    """One run of ``views`` same-size views as resampling inputs: row 0 of each [2, B * views] tensor is
    horizontal (left, width, flip, gain 1/255), row 1 vertical (top, height, no flip, gain 1); columns
    sample-major (sample b's views at b * views ...), the order in which the matrices are used."""

    size: int
    views: int
    start: Tensor
    length: Tensor
    flip: Tensor
    gain: Tensor


def _crop_run(size: int, views: int, boxes: CropBoxes, flip: Tensor) -> _CropRun:
    """A :class:`_CropRun` from view-major [views * B] boxes and flips, computed where they live."""

    def sample_major(values: Tensor) -> Tensor:
        return values.view(views, -1).t().reshape(-1)

    start = torch.stack([sample_major(boxes.left), sample_major(boxes.top)])
    length = torch.stack([sample_major(boxes.width), sample_major(boxes.height)])
    flips = torch.stack([sample_major(flip), torch.zeros_like(flip)])
    gain = torch.tensor([[1.0 / 255.0], [1.0]], device=flip.device).expand_as(start).contiguous()
    return _CropRun(size, views, start, length, flips, gain)


def _render_crop_runs(
    images: Sequence[Tensor] | Tensor, runs: Sequence[_CropRun], max_pixels_per_chunk: int
) -> list[Tensor]:
    """The work of :func:`resized_crop_runs` for runs given as :class:`_CropRun`."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"a batch of images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        shapes = [(images.shape[-2], images.shape[-1])] * images.shape[0]
    else:
        bad = [tuple(img.shape) for img in images if img.dim() != 3 or img.shape[0] != 3]
        if bad:
            raise ValueError(f"images must be RGB tensors of shape [3, H, W], got shape {bad[0]}")
        shapes = [(img.shape[-2], img.shape[-1]) for img in images]
    if not shapes:
        raise ValueError("resized_crops needs at least one image")
    device = _device_of(images)
    total = len(shapes)
    outputs: list[list[Tensor]] = [[] for _ in runs]
    order: list[int] = []
    for chunk in _chunks_by_size(shapes, max_pixels_per_chunk):
        # The whole batch in its own order (the usual case) needs no gather of images and parameters.
        index = None if chunk == list(range(total)) else to_device(torch.tensor(chunk), device)
        if isinstance(images, Tensor):
            batch = images if index is None else images[index]
        else:
            batch = _as_padded_batch(images, chunk)
        n, _, height, width = batch.shape
        pixels = batch.to(torch.float32).reshape(n, 3 * height, width)
        matrix_width = max(height, width)

        # Per run of G same-size views, one set of resampling matrices for both directions ([2, n·G, s,
        # max(H, W)], the 1/255 folded into the horizontal ones), then two batched matrix products whose
        # operands and results are all plain (strided) views, no copies: horizontally, [n, G·s, W]
        # weights times the transposed [n, 3H, W] pixels give [n, G·s, 3H]; read per (sample, view) as
        # [s·3, H], that times the transposed [s, H] vertical weights gives the crops as [n, G, s
        # (column), 3, s (row)].
        for r, run in enumerate(runs):
            size, views = run.size, run.views
            fields = (run.start, run.length, run.flip, run.gain)
            if index is not None:  # this chunk's samples (all their views)
                fields = (t.view(2, total, views)[:, index].reshape(2, -1) for t in fields)
            start, length, flip, gain = (t.reshape(-1) for t in fields)
            taps = max(_taps(width, size), _taps(height, size))
            matrices = _resampling_rows(start, length, matrix_width, size, flip, taps, gain)
            matrices = matrices.view(2, n * views, size, matrix_width)
            across = matrices[0].view(n, views * size, matrix_width)[..., :width]
            columns = torch.matmul(across, pixels.transpose(1, 2))
            columns = columns.clamp_(0.0, 1.0).view(n * views, size * 3, height)
            down = matrices[1][..., :height]
            crops = torch.matmul(columns, down.transpose(1, 2)).view(n, views, size, 3, size)
            # Into view-major [G, n, 3, s, s] while clamping: one pass that writes a contiguous tensor.
            clamped = torch.empty(views, n, 3, size, size, device=device, dtype=torch.float32)
            outputs[r].append(torch.clamp(crops.permute(1, 0, 3, 4, 2), 0.0, 1.0, out=clamped))
        order.extend(chunk)
    if order == list(range(len(order))):
        return [torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in outputs]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = to_device(inverse, device)
    return [torch.cat(parts, dim=1)[:, inverse] for parts in outputs]


# ------------------------------------------------------------------------------------------ colour ops


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


# ---------------------------------------------------------------------------------------------- blur


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Sampled, normalised 1-D Gaussian kernels [B, 2 * radius + 1] for per-sample ``sigma`` [B]
    (torchvision's ``gaussian_blur`` kernel); sigma 0 gives the identity kernel."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    s = sigma.to(torch.float32)[:, None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    kernels = torch.exp(-0.5 * (x[None, :] / safe) ** 2)
    identity = (x == 0).to(torch.float32).expand_as(kernels)
    kernels = torch.where(s > 0, kernels, identity)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _box_split(sigma: Tensor, passes: int) -> tuple[Tensor, Tensor]:
    """Integer part ``l`` and full radius ``r`` of the extended box whose ``passes``-fold repetition has
    variance sigma² (Gwosdek et al. 2011, the formula of PIL's ``GaussianBlur``)."""
    var = sigma**2 / passes
    whole = torch.floor((torch.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)
    frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * var) / (6.0 * (var - (whole + 1.0) ** 2))
    return whole, whole + frac


def box_blur_reach(max_sigma: float, passes: int = 3) -> int:
    """Half-width in pixels of one extended-box pass for every sigma up to ``max_sigma``: the integer part
    of :func:`_box_split`'s box, plus one, computed on the host (no tensor, no device read)."""
    var = float(max_sigma) ** 2 / passes
    return math.floor((math.sqrt(12.0 * var + 1.0) - 1.0) / 2.0) + 1


def extended_box_kernels(sigma: Tensor, reach: int, passes: int = 3) -> Tensor:
    """One pass of PIL's Gaussian approximation per sample: [B, 2 * reach + 1] weights equal to
    ``1 / (2 r + 1)`` within ``l = floor(r)`` of the centre and the remainder split over the two pixels
    at distance ``l + 1``; sigma 0 gives the identity. ``reach`` must be at least ``l + 1``
    (:func:`box_blur_reach` of the largest sigma)."""
    whole, radius = _box_split(sigma.to(torch.float64), passes)
    whole, radius = whole[:, None], radius[:, None]
    inner = 1.0 / (2.0 * radius + 1.0)
    outer = (1.0 - (2.0 * whole + 1.0) * inner) / 2.0
    distance = torch.arange(-reach, reach + 1, device=sigma.device, dtype=torch.float64).abs()[None, :]
    kernels = torch.where(distance <= whole, inner, torch.where(distance == whole + 1.0, outer, 0.0))
    return kernels.to(torch.float32)


def _border_indices(size: int, radius: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every position of a line padded by ``radius`` on both sides with a mirror:
    ``symmetric`` mirrors including the edge pixel (``c b a | a b c | c b a``); ``reflect`` mirrors
    without it (``c b | a b c | b a``, torch's and torchvision's). The mirrors fold repeatedly, so any
    radius works for any size. (``replicate``, PIL's box blur edge, is ``F.pad``'s own mode.)
    """
    positions = torch.arange(-radius, size + radius, device=device)
    if mode == "symmetric":
        period = 2 * size
        folded = positions.remainder(period)
        return torch.where(folded < size, folded, period - 1 - folded)
    if mode == "reflect":
        if size == 1:
            return torch.zeros_like(positions)
        period = 2 * (size - 1)
        folded = positions.remainder(period)
        return torch.where(folded < size, folded, period - folded)
    raise ValueError(f"mirror padding must be 'symmetric' or 'reflect', got {mode!r}")


def separable_filter(images: Tensor, kernels: Tensor, padding: str = "replicate", passes: int = 1) -> Tensor:
    """Convolve each image of a [B, C, H, W] batch with its own symmetric 1-D kernel (``kernels`` [B, K],
    K odd) along the width and then the height, ``passes`` times each, padding the border every pass.

    One depthwise convolution over the B·C channels per pass, so the whole batch is one kernel launch.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    batch, channels, height, width = images.shape
    if kernels.dim() != 2 or kernels.shape[0] != batch or kernels.shape[1] % 2 == 0:
        raise ValueError(f"kernels must have shape [{batch}, odd length], got {tuple(kernels.shape)}")
    if padding not in ("replicate", "symmetric", "reflect"):
        raise ValueError(f"padding must be 'replicate', 'symmetric' or 'reflect', got {padding!r}")
    taps = kernels.shape[1]
    reach = taps // 2
    weight = kernels.to(images.dtype).repeat_interleave(channels, dim=0)
    x = images.reshape(1, batch * channels, height, width)
    if padding == "replicate":  # the edge pixel repeated (PIL's box blur): torch's own padding kernel

        def pad(x: Tensor, dim: int) -> Tensor:
            return F.pad(x, (reach, reach, 0, 0) if dim == 3 else (0, 0, reach, reach), mode="replicate")

    else:  # the mirrors: a gather of precomputed source indices
        columns = _border_indices(width, reach, padding, images.device)
        rows = _border_indices(height, reach, padding, images.device)

        def pad(x: Tensor, dim: int) -> Tensor:
            return x.index_select(dim, columns if dim == 3 else rows)

    for _ in range(passes):
        x = F.conv2d(pad(x, 3), weight.view(-1, 1, 1, taps), groups=batch * channels)
    for _ in range(passes):
        x = F.conv2d(pad(x, 2), weight.view(-1, 1, taps, 1), groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def gaussian_blur(images: Tensor, sigma: Tensor, radius: int, padding: str = "reflect") -> Tensor:
    """Blur each image of a batch with a sampled Gaussian of its own ``sigma`` ([B]; 0 = unchanged),
    ``2 * radius + 1`` taps: torchvision's ``gaussian_blur`` with per-sample sigma."""
    return separable_filter(images, gaussian_kernels(sigma, radius), padding)


def pil_gaussian_blur(
    images: Tensor, sigma: Tensor, max_sigma: float | None = None, passes: int = 3
) -> Tensor:
    """Blur each image of a batch as PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` does, per-sample sigma.

    PIL approximates the Gaussian by ``passes`` extended box blurs whose combined variance is exactly
    sigma², each pass with the edge pixel repeated at the border; the same passes run here, in float
    (PIL rounds to 8 bits after each). Give ``max_sigma`` (a bound on ``sigma``) to avoid reading the
    largest sigma back from the device.
    """
    if max_sigma is None:
        max_sigma = float(sigma.max()) if sigma.numel() else 0.0
    reach = box_blur_reach(max_sigma, passes)
    return separable_filter(images, extended_box_kernels(sigma, reach, passes), "replicate", passes)


# ---------------------------------------------------------------------------------------- multi-crop


@dataclass(frozen=True)
class ViewRecipe:
    """What differs between DINO's views: output size, crop scale range, blur and solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def to_device(values: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device`` without waiting. To a GPU it goes through pinned memory (PyTorch's caching
    host allocator keeps the block until the copy is done), so the copy is queued on the current stream
    and the host goes on; from pageable memory the driver may first wait for that stream."""
    if device.type == "cuda" and values.device.type == "cpu":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _device_of(images: Sequence[Tensor] | Tensor) -> torch.device:
    return images.device if isinstance(images, Tensor) else images[0].device


class ViewParameters(NamedTuple):
    """Every random choice made for one view of a batch (tensors of shape [B] unless noted).

    ``order[b]`` [B, 4] lists the jitter operations in the order sample b applies them (0 brightness,
    1 contrast, 2 saturation, 3 hue); the jitter factors are only used where ``jitter`` is true;
    ``blur_sigma`` is 0 where the view is not blurred.
    """

    boxes: CropBoxes
    flip: Tensor
    jitter: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    blur_sigma: Tensor
    solarize: Tensor


def _as_views(rendered: Sequence[Tensor], runs: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Split each run's [views * B, ...] tensor into its views' [B, ...] batches, in view order."""
    return [
        view
        for x, (a, b) in zip(rendered, runs, strict=True)
        for view in x.unflatten(0, (b - a, -1)).unbind(0)
    ]


def _join_parameters(params: Sequence[ViewParameters]) -> ViewParameters:
    """Several views' parameters as one, their samples one view after the other."""
    if len(params) == 1:
        return params[0]
    boxes = CropBoxes(*(torch.cat(field) for field in zip(*(p.boxes for p in params), strict=True)))
    rest = (torch.cat(field) for field in zip(*(p[1:] for p in params), strict=True))
    return ViewParameters(boxes, *rest)


def _slice_parameters(params: ViewParameters, start: int, end: int) -> ViewParameters:
    """Samples ``start .. end - 1`` of every parameter (views, no copies)."""
    return ViewParameters(
        CropBoxes(*(f[start:end] for f in params.boxes)), *(f[start:end] for f in params[1:])
    )


def _split_parameters(params: ViewParameters, views: int) -> list[ViewParameters]:
    """The inverse of :func:`_join_parameters` for ``views`` views of equal batch size."""
    boxes = [CropBoxes(*parts) for parts in zip(*(field.chunk(views) for field in params.boxes), strict=True)]
    rest = zip(*(field.chunk(views) for field in params[1:]), strict=True)
    return [ViewParameters(b, *fields) for b, fields in zip(boxes, rest, strict=True)]


class _RunPlan(NamedTuple):
    """What rendering one run of same-size views needs, derived from its parameters ([N] = views × B
    samples, view-major), on the images' device; ``hue_counts`` on the host."""

    crops: _CropRun
    keep: Tensor  # [4, N]: per jitter position, each sample's blend factor (1 for the hue and no jitter)
    rest: Tensor  # [4, N]: 1 - keep
    with_mean: Tensor  # [4, N]: 1 where the blend is the contrast (reference: mean gray)
    with_gray: Tensor  # [4, N]: 1 where the blend is the saturation (reference: gray)
    hue_index: Tensor  # the samples with a hue, ranked by its position (block p: hue at position p)
    hue_shift: Tensor  # their shifts, same order
    hue_counts: list[int]  # block lengths, positions 0-3
    grayscale: Tensor  # [N] bool
    blur_index: Tensor  # the blurred samples
    blur_kernels: Tensor  # [len(blur_index), taps]: their extended-box kernels (float32)
    solarize: Tensor  # [N] bool


def _plan_runs(
    params: Sequence[ViewParameters],
    shapes: Sequence[tuple[int, int]],
    device: torch.device,
    blur_reach: int,
    blur_passes: int,
) -> list[_RunPlan]:
    """Turn each run's parameters into its :class:`_RunPlan`, computed where they were drawn, then moved
    to ``device``: with parameters drawn on the CPU, a GPU batch runs no kernel on them and needs no
    device-to-host read (the counts that size the hue and blur blocks are host values already); drawn on
    the device, the counts take one read per batch.

    The two costly operations, hue and blur, run only on the samples that drew them: the samples are
    ranked by the step at which they need each, and each step gathers its contiguous block of that
    ranking.
    """
    # Jitter position (0-3) of the hue per sample, 4 where the view has no jitter.
    hue_slots = [torch.where(p.jitter, (p.order == 3).to(torch.uint8).argmax(dim=1), 4) for p in params]
    blurred = [p.blur_sigma > 0 for p in params]
    positions = torch.arange(4, device=hue_slots[0].device)
    counts = torch.stack(
        [
            torch.cat([(slot[:, None] == positions).sum(dim=0), b.sum().view(1)])
            for slot, b in zip(hue_slots, blurred, strict=True)
        ]
    ).tolist()  # a host read only when the parameters are on a GPU
    plans = []
    for p, (size, views), slot, b, n in zip(params, shapes, hue_slots, blurred, counts, strict=True):
        # Per sample and position: the blend factor (1 for the hue and for skipped jitter) and which
        # reference it blends with (black: neither weight; mean gray: contrast; gray: saturation).
        op = torch.where(p.jitter[:, None], p.order, -1).t()  # [4, N]
        keep = torch.where(
            op == 0, p.brightness, torch.where(op == 1, p.contrast, torch.where(op == 2, p.saturation, 1.0))
        ).to(torch.float32)
        hue_index = torch.argsort(slot, stable=True)[: sum(n[:4])]
        blur_index = torch.argsort((~b).to(torch.uint8), stable=True)[: n[4]]
        plans.append(
            _RunPlan(
                _crop_run(size, views, p.boxes, p.flip),
                keep,
                1.0 - keep,
                (op == 1).to(torch.float32),
                (op == 2).to(torch.float32),
                hue_index,
                p.hue[hue_index].to(torch.float32),
                n[:4],
                p.grayscale,
                blur_index,
                extended_box_kernels(p.blur_sigma[blur_index], blur_reach, blur_passes),
                p.solarize,
            )
        )
    return _move_plans(plans, device)


def _move_plans(plans: list[_RunPlan], device: torch.device) -> list[_RunPlan]:
    """The plans' tensors on ``device``: one copy per dtype for all of them (flattened, concatenated,
    split again into views there), not one per tensor."""
    tensors: dict[tuple[int, str, str | None], Tensor] = {}
    for i, plan in enumerate(plans):
        for name, value in plan._asdict().items():
            if isinstance(value, _CropRun):
                tensors.update({(i, name, k): v for k, v in value._asdict().items() if isinstance(v, Tensor)})
            elif isinstance(value, Tensor):
                tensors[(i, name, None)] = value
    if all(t.device == device for t in tensors.values()):
        return plans
    moved = _packed_copy(tensors, device)
    out = []
    for i, plan in enumerate(plans):
        values = plan._asdict()
        for name, value in values.items():
            if isinstance(value, _CropRun):
                values[name] = value._replace(
                    **{k: moved[(i, name, k)] for k, v in value._asdict().items() if isinstance(v, Tensor)}
                )
            elif isinstance(value, Tensor):
                values[name] = moved[(i, name, None)]
        out.append(_RunPlan(**values))
    return out


def _packed_copy(tensors: dict, device: torch.device) -> dict:
    """``tensors`` (a dict of tensors) on ``device``, in one copy per dtype: each dtype's tensors are
    flattened and concatenated, copied, and split there into views of their own shapes."""
    moved = {}
    for dtype in {t.dtype for t in tensors.values()}:
        keys = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in keys])
        parts = to_device(flat, device).split([tensors[k].numel() for k in keys])
        moved.update({k: part.view(tensors[k].shape) for k, part in zip(keys, parts, strict=True)})
    return moved


def _colour_jitter(x: Tensor, plan: _RunPlan) -> Tensor:
    """Brightness, contrast, saturation and hue, each sample in its own order.

    At each of the four positions every sample runs exactly one operation. The first three are all
    ``clip(f * x + (1 - f) * reference)`` with reference black, mean gray or gray, so they run as one
    blend with a per-sample reference and factor (factor 1, an exact no-op, for samples whose operation
    at this position is the hue or that skip jitter). The hue runs on the samples whose hue is at this
    position: block ``position`` of the plan's hue ranking.
    """
    shape = (4, -1, 1, 1, 1)
    keep, rest = plan.keep.view(shape), plan.rest.view(shape)
    with_gray, with_mean = plan.with_gray.view(shape), plan.with_mean.view(shape)
    start = 0
    for position in range(4):
        gray = rgb_to_grayscale(x)
        mean_gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
        reference = torch.addcmul(mean_gray * with_mean[position], gray, with_gray[position])
        x = torch.addcmul(rest[position] * reference, keep[position], x).clamp_(0.0, 1.0)
        count = plan.hue_counts[position]
        if count > 0:
            index = plan.hue_index[start : start + count]
            x[index] = adjust_hue(x[index], plan.hue_shift[start : start + count])
        start += count
    return x


class BatchMultiCrop(nn.Module):
    """DINO's multi-crop augmentation for a whole batch of uint8 images, on their device.

    Same constructor arguments and same output layout as
    :class:`~dino.data.transforms.MultiCropAugmentation` followed by
    :func:`~dino.data.datasets.collate_skipping_bad`: ``[global_1, global_2, local_1, ..., local_n]``,
    float32 [B, 3, size, size] batches normalised with ``mean``/``std``. Parameters are drawn per sample
    and per view from the CPU pipeline's distributions (see the module docstring for the few numerical
    differences); all randomness comes from the ``generator`` given to :meth:`forward`.

    The pixel work is vectorised over the batch: two matmuls per chunk of similar-sized images and run
    of same-size views for crop + resize + flip, then batched colour operations and one grouped
    convolution per blur pass.
    """

    # The paper's recipe, the same numbers as MultiCropAugmentation's torchvision pipelines.
    JITTER = MappingProxyType({"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1})
    JITTER_P = 0.8
    FLIP_P = 0.5
    GRAYSCALE_P = 0.2
    BLUR_SIGMA = (0.1, 2.0)
    BLUR_PASSES = 3  # extended box blurs per direction, as PIL's GaussianBlur

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
        *,
        max_pixels_per_chunk: int = 2**26,
    ) -> None:
        super().__init__()
        global_scale = _check_scale("global_crops_scale", global_crops_scale)
        local_scale = _check_scale("local_crops_scale", local_crops_scale)
        if (
            isinstance(local_crops_number, bool)
            or not isinstance(local_crops_number, int)
            or local_crops_number < 0
        ):
            raise ValueError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
        if max_pixels_per_chunk <= 0:
            raise ValueError(
                f"max_pixels_per_chunk must be a positive pixel count, got {max_pixels_per_chunk}"
            )
        global_size = _check_size("global_crop_size", global_crop_size)
        local_size = _check_size("local_crop_size", local_crop_size)
        blur1, blur2, blur_local = _check_probabilities("blur_probs", blur_probs, 3)
        (solarize,) = _check_probabilities("solarize_prob", [solarize_prob], 1)
        self.views: tuple[ViewRecipe, ...] = (
            ViewRecipe(global_size, global_scale, blur_p=blur1, solarize_p=0.0),
            ViewRecipe(global_size, global_scale, blur_p=blur2, solarize_p=solarize),
        ) + tuple(
            ViewRecipe(local_size, local_scale, blur_p=blur_local, solarize_p=0.0)
            for _ in range(local_crops_number)
        )
        self.max_pixels_per_chunk = int(max_pixels_per_chunk)
        # Consecutive views drawn together: same size and crop scale (they may differ in blur/solarize p).
        self._runs = same_size_runs([(v.size, v.scale) for v in self.views])
        # Per view: crop area range, blur and solarize probabilities, as tensors on the device the draws
        # are made on (made once per device: see _view_table).
        self._view_tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self.register_buffer(
            "mean", torch.tensor(_check_channels("mean", mean, positive=False)).view(1, 3, 1, 1)
        )
        self.register_buffer("std", torch.tensor(_check_channels("std", std, positive=True)).view(1, 3, 1, 1))

    def sample_parameters(
        self, heights: Tensor, widths: Tensor, generator: torch.Generator | None = None
    ) -> list[ViewParameters]:
        """Draw every view's random parameters for images of the given sizes ([B] integer tensors).

        Views of the same size and scale range are drawn together (one set of draws for all of their
        samples), so the number of kernels does not grow with the number of local crops."""
        drawn = self._draw_runs(heights, widths, generator)
        return [
            view
            for (a, b), run in zip(self._runs, drawn, strict=True)
            for view in _split_parameters(run, b - a)
        ]

    def _view_table(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per view: [V, 2] crop area ranges (float64), blur and solarize probabilities, on ``device``
        (plain attributes, not buffers: moving the module to a GPU must not move what the CPU draws with)."""
        if device not in self._view_tables:
            self._view_tables[device] = (
                torch.tensor([v.scale for v in self.views], dtype=torch.float64, device=device),
                torch.tensor([v.blur_p for v in self.views], device=device),
                torch.tensor([v.solarize_p for v in self.views], device=device),
            )
        return self._view_tables[device]

    def _draw_runs(
        self, heights: Tensor, widths: Tensor, generator: torch.Generator | None
    ) -> list[ViewParameters]:
        """The parameters of each run of ``self._runs``, its views' samples one view after the other.

        Every view's parameters are drawn at once, as [views * B] tensors (view-major), and cut into runs:
        the number of kernels depends neither on the number of views nor on the number of runs."""
        n, device, views = heights.numel(), heights.device, len(self.views)
        jitter = self.JITTER
        sigma_lo, sigma_hi = self.BLUR_SIGMA

        def per_sample(values: Tensor) -> Tensor:  # one value per view -> one per (view, sample)
            return values[:, None].expand(views, n).reshape(-1)

        scale, view_blur_p, view_solarize_p = self._view_table(device)
        boxes = _draw_crop_boxes(
            heights.repeat(views),
            widths.repeat(views),
            per_sample(scale[:, 0]),
            per_sample(scale[:, 1]),
            _RATIO,
            generator,
            attempts=10,
        )
        u = torch.rand(views * n, 10, generator=generator, device=device)
        order = torch.rand(views * n, 4, generator=generator, device=device).argsort(dim=1)
        blur_p = per_sample(view_blur_p)
        solarize_p = per_sample(view_solarize_p)
        drawn = ViewParameters(
            boxes=boxes,
            flip=u[:, 0] < self.FLIP_P,
            jitter=u[:, 1] < self.JITTER_P,
            order=order,
            brightness=1.0 + jitter["brightness"] * (2.0 * u[:, 2] - 1.0),
            contrast=1.0 + jitter["contrast"] * (2.0 * u[:, 3] - 1.0),
            saturation=1.0 + jitter["saturation"] * (2.0 * u[:, 4] - 1.0),
            hue=jitter["hue"] * (2.0 * u[:, 5] - 1.0),
            grayscale=u[:, 6] < self.GRAYSCALE_P,
            blur_sigma=torch.where(u[:, 9] < blur_p, sigma_lo + (sigma_hi - sigma_lo) * u[:, 7], 0.0),
            solarize=u[:, 8] < solarize_p,
        )
        if len(self._runs) == 1:
            return [drawn]
        return [_slice_parameters(drawn, a * n, b * n) for a, b in self._runs]

    def augment(
        self,
        images: Sequence[Tensor] | Tensor,
        params: Sequence[ViewParameters],
        group_views: bool | None = None,
    ) -> list[Tensor]:
        """Render every view from ``params`` as float [B, 3, size, size] batches in [0, 1] (not normalised).

        On a GPU the views of the same size are rendered together, as one batch of views × B samples
        (on a CPU one view at a time, which keeps each pass in cache; ``group_views`` overrides the
        choice, the result is the same).
        """
        sizes = [v.size for v in self.views]
        if group_views is None:
            group_views = _device_of(images).type == "cuda"
        runs = same_size_runs(sizes, None if group_views else 1)
        joined = [_join_parameters(params[a:b]) for a, b in runs]
        return _as_views(self._render(images, runs, joined), runs)

    def _render(
        self,
        images: Sequence[Tensor] | Tensor,
        runs: Sequence[tuple[int, int]],
        params: Sequence[ViewParameters],
    ) -> list[Tensor]:
        """Render runs ``[start, end)`` of same-size views with their joined parameters: one float
        [views * B, 3, size, size] tensor in [0, 1] per run. The parameters may live on the CPU while
        the images are on a GPU (see :func:`_plan_runs`)."""
        device = _device_of(images)
        shapes = [(self.views[a].size, b - a) for a, b in runs]
        passes = self.BLUR_PASSES
        plans = _plan_runs(params, shapes, device, box_blur_reach(self.BLUR_SIGMA[1], passes), passes)
        crops = _render_crop_runs(images, [q.crops for q in plans], self.max_pixels_per_chunk)
        rendered: list[Tensor] = []
        for x, q in zip(crops, plans, strict=True):
            x = _colour_jitter(x.flatten(0, 1), q)  # [views * B, 3, s, s]
            x = torch.where(q.grayscale[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
            if q.blur_index.numel():
                # index_put (not index_copy): deterministic on CUDA under torch.use_deterministic_algorithms
                x[q.blur_index] = separable_filter(x[q.blur_index], q.blur_kernels, "replicate", passes)
            rendered.append(torch.where(q.solarize[:, None, None, None], solarize(x), x))
        return rendered

    def normalize(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Subtract ``mean`` and divide by ``std`` per channel (on each view's device, so a module left on
        the CPU still normalises CUDA views)."""
        return [(v - self.mean.to(v.device)) / self.std.to(v.device) for v in views]

    def forward(
        self,
        images: Sequence[Tensor] | Tensor,
        generator: torch.Generator | None = None,
        group_views: bool | None = None,
    ) -> list[Tensor]:
        """Views of a batch: ``images`` is a list of uint8 [3, H, W] tensors (any sizes) or a uint8
        [B, 3, H, W] batch, all on one device. The random parameters are drawn from ``generator`` on its
        device, the CPU or the images' device (None: the CPU's global generator); drawn on the CPU, a
        GPU batch needs no read from the device and fewer kernels (the data path's choice).
        ``group_views`` (default: on GPUs) renders same-size views together; the views are the same
        either way."""
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"a batch of images must have shape [B, 3, H, W], got {tuple(images.shape)}")
            device = images.device
            shapes = [tuple(images.shape[-2:])] * images.shape[0]
        else:
            if len(images) == 0:
                raise ValueError("BatchMultiCrop needs at least one image")
            device = images[0].device
            if any(img.device != device for img in images):
                raise ValueError(
                    "all images of a batch must be on the same device; move them with .to(device)"
                )
            shapes = [tuple(img.shape[-2:]) for img in images]
        drawn_on = torch.device("cpu") if generator is None else generator.device
        if drawn_on.type not in ("cpu", device.type):
            raise ValueError(
                f"the generator is on {generator.device} but the images are on {device}; "
                "use a CPU generator (torch.Generator()) or one on the images' device"
            )
        heights = torch.tensor([h for h, _ in shapes], device=drawn_on)
        widths = torch.tensor([w for _, w in shapes], device=drawn_on)
        if group_views is None:
            group_views = device.type == "cuda"
        if not group_views:
            return self.normalize(
                self.augment(images, self.sample_parameters(heights, widths, generator), False)
            )
        # On a GPU: draw, render and normalise whole runs of same-size views, then split them into views.
        rendered = self._render(images, self._runs, self._draw_runs(heights, widths, generator))
        return _as_views(self.normalize(rendered), self._runs)

    def extra_repr(self) -> str:
        g, local = self.views[0], self.views[2:]
        text = f"global_crops_scale={g.scale}, global_crop_size={g.size}, local_crops_number={len(local)}"
        if local:
            text += f", local_crops_scale={local[0].scale}, local_crop_size={local[0].size}"
        return text
