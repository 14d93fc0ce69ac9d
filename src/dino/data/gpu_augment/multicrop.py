"""DINO's multi-crop augmentation of a whole batch (:class:`BatchMultiCrop`) and its planning: the random
parameters of every view drawn at once, and turned into per-run plans that the pixel work reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dino.data.gpu_augment.blur import box_blur_reach, extended_box_kernels, separable_filter
from dino.data.gpu_augment.colour import adjust_hue, rgb_to_grayscale, solarize
from dino.data.gpu_augment.crop_boxes import CROP_RATIO, CropBoxes, draw_crop_boxes
from dino.data.gpu_augment.devices import device_of, to_device
from dino.data.gpu_augment.resampling import CropRun, render_crop_runs, same_size_runs
from dino.data.multicrop_spec import MultiCropSpec

__all__ = ["BatchMultiCrop", "ViewParameters", "ViewRecipe"]


@dataclass(frozen=True)
class ViewRecipe:
    """What differs between DINO's views: output size, crop scale range, blur and solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


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

    crops: CropRun
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
                CropRun.from_boxes(size, views, p.boxes, p.flip),
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
            if isinstance(value, CropRun):
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
            if isinstance(value, CropRun):
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

    Configured as :class:`~dino.data.transforms.MultiCropAugmentation` is (a
    :class:`~dino.data.multicrop_spec.MultiCropSpec`, its fields as keyword arguments, or both; kept as
    ``spec``), with the same output layout as that pipeline followed by
    :func:`~dino.data.datasets.collate_skipping_bad`: ``[global_1, global_2, local_1, ..., local_n]``,
    float32 [B, 3, size, size] batches normalised with ``mean``/``std``. Parameters are drawn per sample
    and per view from the CPU pipeline's distributions (see :mod:`dino.data.gpu_augment` for the few
    numerical differences); all randomness comes from the ``generator`` given to :meth:`forward`.

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

    mean: Tensor  # buffers [1, 3, 1, 1]
    std: Tensor

    def __init__(
        self, spec: MultiCropSpec | None = None, *, max_pixels_per_chunk: int = 2**26, **fields: Any
    ) -> None:
        super().__init__()
        self.spec = spec = MultiCropSpec.resolve(spec, **fields)
        if max_pixels_per_chunk <= 0:
            raise ValueError(
                f"max_pixels_per_chunk must be a positive pixel count, got {max_pixels_per_chunk}"
            )
        global_size, global_scale = spec.global_crop_size, spec.global_crops_scale
        blur1, blur2, blur_local = spec.blur_probs
        self.views: tuple[ViewRecipe, ...] = (
            ViewRecipe(global_size, global_scale, blur_p=blur1, solarize_p=0.0),
            ViewRecipe(global_size, global_scale, blur_p=blur2, solarize_p=spec.solarize_prob),
        ) + tuple(
            ViewRecipe(spec.local_crop_size, spec.local_crops_scale, blur_p=blur_local, solarize_p=0.0)
            for _ in range(spec.local_crops_number)
        )
        self.max_pixels_per_chunk = int(max_pixels_per_chunk)
        # Consecutive views drawn together: same size and crop scale (they may differ in blur/solarize p).
        self._runs = same_size_runs([(v.size, v.scale) for v in self.views])
        # Per view: crop area range, blur and solarize probabilities, as tensors on the device the draws
        # are made on (made once per device: see _view_table).
        self._view_tables: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

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
        boxes = draw_crop_boxes(
            heights.repeat(views),
            widths.repeat(views),
            per_sample(scale[:, 0]),
            per_sample(scale[:, 1]),
            CROP_RATIO,
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
            group_views = device_of(images).type == "cuda"
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
        device = device_of(images)
        shapes = [(self.views[a].size, b - a) for a, b in runs]
        passes = self.BLUR_PASSES
        plans = _plan_runs(params, shapes, device, box_blur_reach(self.BLUR_SIGMA[1], passes), passes)
        crops = render_crop_runs(images, [q.crops for q in plans], self.max_pixels_per_chunk)
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
                f"the generator is on {drawn_on} but the images are on {device}; "
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
