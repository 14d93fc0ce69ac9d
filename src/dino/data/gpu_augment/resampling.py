"""Crop + bicubic resize + flip of a whole batch: per-sample separable resampling matrices, two matmuls.

Every crop is ``W_y · image · W_xᵀ`` with matrices holding PIL's antialiased bicubic weights, for any
mix of image sizes (zero-padded to a common size, which the weights never reach); see
:mod:`dino.data.gpu_augment` for how it matches PIL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dino.data.gpu_augment.crop_boxes import CropBoxes
from dino.data.gpu_augment.devices import device_of, to_device

__all__ = [
    "CropRun",
    "render_crop_runs",
    "resampling_matrices",
    "resized_crop_runs",
    "resized_crops",
    "same_size_runs",
]

_BICUBIC_A = -0.5  # PIL's bicubic kernel parameter (torch's non-antialiased bicubic uses -0.75)


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
            torch.zeros_like(boxes[v].top, dtype=torch.bool) if f is None else f
            for v, f in enumerate(flips[a:b], start=a)
        ]
        run_boxes = CropBoxes(*(torch.cat(field) for field in zip(*boxes[a:b], strict=True)))
        joined.append(CropRun.from_boxes(sizes[a], b - a, run_boxes, torch.cat(flip)))
    return render_crop_runs(images, joined, max_pixels_per_chunk)


class CropRun(NamedTuple):
    """One run of ``views`` same-size views as resampling inputs: row 0 of each [2, B * views] tensor is
    horizontal (left, width, flip, gain 1/255), row 1 vertical (top, height, no flip, gain 1); columns
    sample-major (sample b's views at b * views ...), the order in which the matrices are used."""

    size: int
    views: int
    start: Tensor
    length: Tensor
    flip: Tensor
    gain: Tensor

    @classmethod
    def from_boxes(cls, size: int, views: int, boxes: CropBoxes, flip: Tensor) -> CropRun:
        """The run of view-major [views * B] boxes and flips, computed where they live."""

        def sample_major(values: Tensor) -> Tensor:
            return values.view(views, -1).t().reshape(-1)

        start = torch.stack([sample_major(boxes.left), sample_major(boxes.top)])
        length = torch.stack([sample_major(boxes.width), sample_major(boxes.height)])
        flips = torch.stack([sample_major(flip), torch.zeros_like(flip)])
        gain = torch.tensor([[1.0 / 255.0], [1.0]], device=flip.device).expand_as(start).contiguous()
        return cls(size, views, start, length, flips, gain)


def _image_shapes(images: Sequence[Tensor] | Tensor) -> list[tuple[int, int]]:
    """Each image's (height, width), the images checked to be RGB and at least one."""
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
    return shapes


def _render_run(
    run: CropRun, batch: Tensor, index: Tensor | None, total: int, device: torch.device
) -> Tensor:
    """One run's crops of the chunk ``batch`` ([n, 3, H, W], the samples ``index`` of ``total``; ``None``:
    all of them, in order), view-major [G, n, 3, s, s]."""
    n, _, height, width = batch.shape
    pixels = batch.to(torch.float32).reshape(n, 3 * height, width)
    matrix_width = max(height, width)
    # Per run of G same-size views, one set of resampling matrices for both directions ([2, n·G, s,
    # max(H, W)], the 1/255 folded into the horizontal ones), then two batched matrix products whose
    # operands and results are all plain (strided) views, no copies: horizontally, [n, G·s, W]
    # weights times the transposed [n, 3H, W] pixels give [n, G·s, 3H]; read per (sample, view) as
    # [s·3, H], that times the transposed [s, H] vertical weights gives the crops as [n, G, s
    # (column), 3, s (row)].
    size, views = run.size, run.views
    fields: tuple[Tensor, ...] = (run.start, run.length, run.flip, run.gain)
    if index is not None:  # this chunk's samples (all their views)
        fields = tuple(t.view(2, total, views)[:, index].reshape(2, -1) for t in fields)
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
    return torch.clamp(crops.permute(1, 0, 3, 4, 2), 0.0, 1.0, out=clamped)


def render_crop_runs(
    images: Sequence[Tensor] | Tensor, runs: Sequence[CropRun], max_pixels_per_chunk: int
) -> list[Tensor]:
    """The work of :func:`resized_crop_runs` for runs given as :class:`CropRun`."""
    shapes = _image_shapes(images)
    device = device_of(images)
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
        for r, run in enumerate(runs):
            outputs[r].append(_render_run(run, batch, index, total, device))
        order.extend(chunk)
    if order == list(range(len(order))):
        return [torch.cat(parts, dim=1) if len(parts) > 1 else parts[0] for parts in outputs]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = to_device(inverse, device)
    return [torch.cat(parts, dim=1)[:, inverse] for parts in outputs]
