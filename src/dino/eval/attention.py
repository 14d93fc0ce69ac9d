"""Self-attention maps of the last block: heat maps, mass-thresholded masks, animations, and their Jaccard.

For each head, the attention of the [CLS] query to every patch of the last block is a distribution over
patches. :func:`mass_masks` keeps, per head, the smallest set of highest-attention patches holding at least
``threshold`` of that mass (the paper uses 60%). The paper's quantitative check (Figure 4's table) compares
such masks with the ground-truth masks by the Jaccard index as its first author described it
(facebookresearch/dino issue 54): for each object of an image (each label other than 0 and 255), the best
head's Jaccard with that object's mask, averaged over the image's objects, then over images
(:func:`object_jaccards`, :func:`attention_jaccard`'s ``jaccard``). Also reported: the Jaccard of each head
with the whole foreground (labels other than 0 and 255), void pixels ignored (``foreground_*``).

Images are resized so their shorter side is ``image_size`` (480 by default, as in the paper's figures) and
both sides are rounded to multiples of the patch size, so any aspect ratio works (position embeddings are
interpolated). Patch-level maps are upsampled with nearest-neighbour interpolation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from dino.checkpoint import write_atomically
from dino.data.datasets import IMAGE_EXTENSIONS, ImageDecodeError, load_rgb
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino.eval.davis_metrics import VOID_LABEL, region_similarity
from dino.eval.images import image_tensor, normalize
from dino.eval.retrieval import batches_by_size
from dino.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})


def attention_size(height: int, width: int, image_size: int | None, patch_size: int) -> tuple[int, int]:
    """(height, width) for the model: shorter side ``image_size`` (None: unchanged), multiples of the patch."""
    scale = 1.0 if image_size is None else image_size / min(height, width)
    new_height, new_width = (
        max(patch_size, int(round(side * scale / patch_size)) * patch_size) for side in (height, width)
    )
    return new_height, new_width


def to_model_input(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """A normalised [3, H, W] float tensor of an RGB picture already at model resolution."""
    return normalize(image_tensor(image.convert("RGB")), mean, std)


def resize_for_model(image: Image.Image, image_size: int | None, patch_size: int) -> Image.Image:
    """Bicubic resize to :func:`attention_size`."""
    height, width = attention_size(image.height, image.width, image_size, patch_size)
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


@torch.no_grad()
def cls_attention(model: VisionTransformer, images: Tensor) -> Tensor:
    """Last-block attention of [CLS] to the patches, per head: [B, heads, h, w] (each head sums to 1 over
    all tokens, so slightly less over the patches alone)."""
    _, _, height, width = images.shape
    grid = (height // model.patch_size, width // model.patch_size)
    attn = model.get_last_selfattention(images)  # [B, heads, 1 + N, 1 + N]
    return attn[:, :, 0, 1:].float().reshape(images.shape[0], attn.shape[1], *grid)


def mass_masks(attention: Tensor, threshold: float = 0.6) -> Tensor:
    """Per head, the smallest set of top patches holding ≥ ``threshold`` of the head's patch attention.

    ``attention`` is [heads, h, w]; the result is a boolean tensor of the same shape. A patch is kept when
    the (normalised) mass of the patches ranked strictly above it is below ``threshold``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    heads = attention.shape[0]
    flat = attention.reshape(heads, -1)
    flat = flat / flat.sum(dim=1, keepdim=True)
    values, order = flat.sort(dim=1, descending=True)
    mass_before = values.cumsum(dim=1) - values
    keep_sorted = mass_before < threshold
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.reshape(attention.shape)


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of [heads, h, w] maps (float or bool) to ``size`` (height, width)."""
    out = F.interpolate(maps[None].float(), size=size, mode="nearest")[0]
    return out.bool() if maps.dtype == torch.bool else out


def jaccard(prediction: np.ndarray, labels: np.ndarray, void_label: int = VOID_LABEL) -> float:
    """Jaccard index of a predicted foreground mask with the foreground of a class-label mask.

    Foreground is any label other than 0 and ``void_label``; void pixels count in neither the intersection
    nor the union. Two empty foregrounds give 1. This is DAVIS's region similarity
    (:func:`dino.eval.davis_metrics.region_similarity`) of the foreground, with the void pixels as void.
    """
    if prediction.shape != labels.shape:
        raise ValueError(f"mask is {prediction.shape} but the ground truth is {labels.shape}")
    return region_similarity(labels != 0, prediction, labels == void_label)


def object_jaccards(
    masks: np.ndarray, labels: np.ndarray, void_label: int = VOID_LABEL
) -> dict[int, np.ndarray]:
    """For every object of ``labels`` (each id other than 0 and ``void_label``), the Jaccard index of each
    head's mask (``masks``: [heads, H, W] booleans) with that object's mask, over all pixels (as the paper's
    evaluation: void pixels a mask covers count in the union)."""
    if masks.shape[1:] != labels.shape:
        raise ValueError(f"masks are {masks.shape[1:]} but the ground truth is {labels.shape}")
    heads = masks.reshape(masks.shape[0], -1)
    flat = labels.reshape(-1)
    scores = {}
    for obj in np.unique(flat):
        if obj == 0 or obj == void_label:
            continue
        target = flat == obj
        inter = (heads & target).sum(axis=1)
        union = (heads | target).sum(axis=1)
        scores[int(obj)] = inter / union
    return scores


# --- Pictures --------------------------------------------------------------------------------------------

# Anchor colours of a dark-to-bright heat colour map (black, purple, red, orange, pale yellow).
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """RGB uint8 image of a 2-D map, min-max scaled to [0, 1] and coloured dark (low) to bright (high)."""
    v = values.astype(np.float64)
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    pos = v * (len(_HEAT_ANCHORS) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(_HEAT_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - frac) + _HEAT_ANCHORS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) · image + alpha · colors`` for uint8 RGB arrays."""
    return np.round(image * (1 - alpha) + colors * alpha).astype(np.uint8)


# The colours that mask overlays and their legends share: the mask's tint, and a swatch for the darkened rest.
MASK_COLOUR = (255, 64, 64)
DARKENED_COLOUR = (77, 77, 77)


def mask_overlay(image: np.ndarray, mask: np.ndarray, color: Sequence[int] = MASK_COLOUR) -> np.ndarray:
    """The image with the mask tinted and everything else darkened."""
    out = image.astype(np.float64) * 0.35
    tinted = image * 0.55 + np.asarray(color, dtype=np.float64) * 0.45
    out[mask] = tinted[mask]
    return np.round(out).astype(np.uint8)


def save_attention_pictures(
    image: Image.Image, attention: Tensor, masks: Tensor, out_dir: Path, threshold: float = 0.6
) -> list[Path]:
    """Write, for one image: the image at model resolution; per head and for the mean of the heads a heat
    map and a heat-map overlay, per head the mass-mask overlay, each titled, with a colour bar (heat maps)
    or a legend (masks); per head the bare binary mask (``mask-head<h>.png``, 255 inside, a label map for
    other programs); ``attention.npz`` with the patch-level maps (``attention`` [heads, h, w] float32,
    ``masks`` bool, ``threshold``) for programs; and ``summary.png``, all of it in one titled figure.

    ``image`` is the picture at model resolution; ``attention`` and ``masks`` are [heads, h, w]
    (``masks`` kept ``threshold`` of each head's attention mass).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    size = (image.height, image.width)
    pixels = np.array(image.convert("RGB"))
    heat = upsample(attention, size).cpu().numpy()
    big_masks = upsample(masks, size).cpu().numpy()
    written = [out_dir / "image.png"]
    Image.fromarray(pixels).save(written[0])
    data = out_dir / "attention.npz"
    _save_npz(
        data,
        attention=attention.float().cpu().numpy(),
        masks=masks.cpu().numpy(),
        threshold=np.float32(threshold),
    )
    written.append(data)
    where = f"{out_dir.name}, last-block [CLS]"
    maps = [(f"head{h}", f"head {h}", heat[h], big_masks[h]) for h in range(heat.shape[0])]
    maps.append(("mean", "mean of heads", heat.mean(axis=0), None))
    mask_legend = [
        (MASK_COLOUR, f"top patches holding {threshold:.0%} of the head's attention"),
        (DARKENED_COLOUR, "the rest (darkened)"),
    ]
    for name, label, values, mask in maps:
        colors = heat_colors(values)
        bar = (float(values.min()), float(values.max()))
        pictures = {
            f"attn-{name}.png": labelled_picture(colors, f"{label} attention: {where}", colour_bar=bar),
            f"overlay-{name}.png": labelled_picture(
                blend(pixels, colors), f"{label} attention over the image: {where}", colour_bar=bar
            ),
        }
        if mask is not None:
            pictures[f"mask-overlay-{name}.png"] = labelled_picture(
                mask_overlay(pixels, mask), f"{label} mass mask: {where}", legend=mask_legend
            )
            pictures[f"mask-{name}.png"] = Image.fromarray((mask * 255).astype(np.uint8))
        for filename, picture in pictures.items():
            picture.save(out_dir / filename)
            written.append(out_dir / filename)
    written.append(save_attention_summary(pixels, heat, big_masks, out_dir / "summary.png", out_dir.name))
    return written


def _save_npz(path: Path, **arrays: Any) -> None:
    """``np.savez_compressed`` through a temporary file, renamed when complete. (Any: numpy's stub types
    the arrays given by name like its allow_pickle flag.)"""
    write_atomically(path, lambda fh: np.savez_compressed(fh, **arrays))


def labelled_picture(
    array: np.ndarray,
    title: str,
    colour_bar: tuple[float, float] | None = None,
    legend: Sequence[tuple[tuple[int, int, int], str]] = (),
) -> Image.Image:
    """An RGB uint8 picture with its title above it and either a colour bar on its right (``colour_bar``:
    the values at its dark and bright ends, the map's minimum and maximum attention weight) or a legend of
    its colours below it. Drawn with Pillow alone, not a matplotlib figure per picture (a folder of images
    gets a dozen or more of these per image)."""
    from PIL import ImageDraw, ImageFont

    height, width = array.shape[:2]
    size = max(10, min(16, height // 24))
    font = ImageFont.load_default(size=size)
    line = size + 4
    pad = 4
    bar_width = 0
    bar_labels: list[str] = []
    if colour_bar is not None:
        bar_labels = [f"{colour_bar[1]:.3g} (max)", f"{colour_bar[0]:.3g} (min)", "attention", "weight"]
        bar_width = 12 + pad + max(int(font.getlength(t)) for t in bar_labels) + pad
    legend_height = len(legend) * line + (pad if legend else 0)
    text_width = max([int(font.getlength(title))] + [int(font.getlength(t)) + line + pad for _, t in legend])
    canvas_width = max(width + bar_width, text_width) + 2 * pad
    canvas = Image.new("RGB", (canvas_width, line + pad + height + legend_height + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad // 2), title, fill="black", font=font)
    top = line + pad
    canvas.paste(Image.fromarray(array), (pad, top))
    if colour_bar is not None:
        x = pad + width + pad
        ramp = heat_colors(np.linspace(1.0, 0.0, height)[:, None].repeat(12, axis=1))
        canvas.paste(Image.fromarray(ramp), (x, top))
        labels_x = x + 12 + pad
        draw.text((labels_x, top), bar_labels[0], fill="black", font=font)
        draw.text((labels_x, top + height - line), bar_labels[1], fill="black", font=font)
        if height >= 4 * line:  # room between the ends: say what the colours measure
            middle = top + height // 2 - line
            draw.text((labels_x, middle), bar_labels[2], fill="black", font=font)
            draw.text((labels_x, middle + line), bar_labels[3], fill="black", font=font)
    y = top + height + pad
    for colour, text in legend:
        draw.rectangle((pad, y + 2, pad + line - 4, y + line - 2), fill=colour, outline="black")
        draw.text((pad + line, y), text, fill="black", font=font)
        y += line
    return canvas


def _unit_rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    """An 8-bit RGB colour as matplotlib takes it (0-1)."""
    red, green, blue = (c / 255 for c in colour)
    return red, green, blue


def save_attention_summary(
    pixels: np.ndarray, heat: np.ndarray, masks: np.ndarray, path: Path, name: str
) -> Path:
    """One titled figure of an image's attention, readable on its own: the image, the mean over heads and
    each head's heat map (each with a colour bar), and each head's mass mask over the image.

    The ``attn-*``/``overlay-*``/``mask-overlay-*`` files beside it show one map each; ``mask-head<h>.png``
    and ``attention.npz`` are the data, for other programs. ``heat`` and ``masks`` are [heads, H, W] at the image's size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    heads = heat.shape[0]
    cols = heads + 2
    fig = Figure(figsize=(3.2 * cols, 6.0), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    axes[0, 0].imshow(pixels)
    axes[0, 0].set_title("image")
    maps = [("mean of heads", heat.mean(axis=0)), *((f"head {h}", heat[h]) for h in range(heads))]
    for ax, (label, values) in zip(axes[0, 1:], maps, strict=True):
        shown = ax.imshow(values, cmap="inferno")
        ax.set_title(label)
        fig.colorbar(shown, ax=ax, shrink=0.8, label="attention weight")
    for h in range(heads):
        ax = axes[1, h + 2]
        ax.imshow(mask_overlay(pixels, masks[h]))
        ax.set_title(f"head {h}: mask")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1, :2]:
        ax.axis("off")
    axes[1, 1].legend(
        handles=[
            Patch(
                color=_unit_rgb(MASK_COLOUR), label="mask: the head's top patches\nholding its attention mass"
            ),
            Patch(color=_unit_rgb(DARKENED_COLOUR), label="darkened: the rest"),
        ],
        loc="center",
        fontsize="small",
        title="bottom row",
    )
    fig.suptitle(
        f"last-block [CLS] attention to the patches: {name} ({pixels.shape[1]}×{pixels.shape[0]} px)"
    )
    canvas = FigureCanvasAgg(fig)
    write_atomically(path, canvas.print_png)
    return path


# --- Folders, batches and videos -------------------------------------------------------------------------


def list_images(path: Path) -> list[Path]:
    """``path`` itself if it is an image, else the images directly inside the folder, sorted by name."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an image nor a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
    return images


def readable_images(paths: Sequence[Path], kept: list[Path]) -> Iterator[Image.Image]:
    """The images of ``paths`` that decode (:func:`~dino.data.datasets.load_rgb`), in order, appending the
    path of each to ``kept``; a file that does not decode (corrupt, truncated, a decompression bomb) is
    skipped with one warning, as ``dino train`` and ``knn`` skip them. ValueError, once the paths are
    exhausted, when none decoded."""
    reasons: list[str] = []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageDecodeError as err:
            log.warning("skipping %s: %s", path, err)
            reasons.append(str(err))
            continue
        kept.append(path)
        yield image
    if not kept and len(paths) == 1:
        raise ValueError(f"cannot use {paths[0]}: {reasons[0]}; give an image file PIL can read")
    if not kept and paths:
        raise ValueError(
            f"none of the {len(paths)} images could be decoded (first: {paths[0].name}: {reasons[0]}); "
            "give images PIL can read"
        )


@dataclass
class AttentionResult:
    """One image's attention: the image at model resolution, [heads, h, w] maps and masks, original size."""

    index: int
    image: Image.Image
    attention: Tensor
    masks: Tensor
    original_size: tuple[int, int]  # height, width


def attention_over_images(
    model: VisionTransformer,
    images: Iterable[Image.Image],
    device: torch.device,
    image_size: int | None = 480,
    threshold: float = 0.6,
    batch_size: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Iterator[AttentionResult]:
    """Attention maps and masks of every image, computed in batches of equally sized images (input order)."""
    originals: dict[int, tuple[Image.Image, tuple[int, int]]] = {}

    def prepared() -> Iterator[tuple[int, Tensor]]:
        for index, image in enumerate(images):
            resized = resize_for_model(image, image_size, model.patch_size)
            originals[index] = (resized, (image.height, image.width))
            yield index, to_model_input(resized, mean, std)

    ready: dict[int, AttentionResult] = {}
    next_index = 0
    for indices, batch in batches_by_size(prepared(), batch_size):
        attn = cls_attention(model, batch.to(device)).cpu()
        for index, maps in zip(indices, attn, strict=True):
            resized, original = originals.pop(index)
            ready[index] = AttentionResult(index, resized, maps, mass_masks(maps, threshold), original)
        while next_index in ready:  # in input order, as soon as possible
            yield ready.pop(next_index)
            next_index += 1


def read_video_frames(path: Path, max_frames: int | None = None) -> tuple[list[Image.Image], float | None]:
    """Frames of a frame folder, an animated GIF, or (with PyAV installed) a video file; and its fps if known."""
    if path.is_dir():
        return list(readable_images(list_images(path)[:max_frames], [])), None
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        try:
            import av
        except ImportError as err:
            raise ValueError(
                f"reading {path.name} needs PyAV (pip install av); or extract its frames to a folder and pass that"
            ) from err
        frames: list[Image.Image] = []
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            for frame in container.decode(stream):
                frames.append(frame.to_image().convert("RGB"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        return frames, fps
    with Image.open(path) as img:
        n = getattr(img, "n_frames", 1)
        duration = img.info.get("duration")
        frames = []
        for i in range(min(n, max_frames or n)):
            img.seek(i)
            frames.append(img.convert("RGB"))
    return frames, (1000.0 / duration if duration else None)


def write_animation(frames: Sequence[np.ndarray], path: Path, fps: float) -> None:
    """Animated GIF (PIL) or, for ``.mp4`` and other video suffixes, a video through PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        import av

        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=max(1, round(fps)))
            stream.height, stream.width = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
            stream.pix_fmt = "yuv420p"
            for array in frames:
                frame = av.VideoFrame.from_ndarray(array[: stream.height, : stream.width], format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return
    pictures = [Image.fromarray(a) for a in frames]
    pictures[0].save(
        path,
        save_all=True,
        append_images=pictures[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
        optimize=False,
    )


def check_animation_output(path: Path) -> None:
    """Fail early when ``path`` asks for a video format that cannot be written here."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        try:
            import av  # noqa: F401
        except ImportError as err:
            raise ValueError(
                f"writing {suffix} needs PyAV (pip install av); use a .gif output instead"
            ) from err
    elif suffix != ".gif":
        raise ValueError(f"animation output {path.name} must end in .gif (or .mp4 with PyAV installed)")


def attention_video(
    model: VisionTransformer,
    frames: Sequence[Image.Image],
    output: Path,
    device: torch.device,
    fps: float = 10.0,
    image_size: int | None = 480,
    head: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> int:
    """Animate the attention overlay (mean over heads, or one ``head``) of every frame; returns frames written."""
    from tqdm import tqdm

    rendered = []
    results = attention_over_images(model, frames, device, image_size, 0.6, batch_size, mean, std)
    for result in tqdm(results, total=len(frames), desc="frames", disable=not progress):
        maps = result.attention
        if head is not None and not 0 <= head < maps.shape[0]:
            raise ValueError(f"--head {head} is out of range: the model has {maps.shape[0]} heads")
        values = maps.mean(dim=0) if head is None else maps[head]
        size = (result.image.height, result.image.width)
        heat = upsample(values[None], size)[0].numpy()
        rendered.append(blend(np.array(result.image), heat_colors(heat), 0.6))
    if not rendered:
        raise ValueError("the video has no frame")
    write_animation(rendered, output, fps)
    return len(rendered)


def _pairs_with_masks(image_paths: Sequence[Path], mask_dir: Path) -> list[tuple[Path, Path]]:
    """Each image with its ground-truth mask ``mask_dir/<stem>.png``; images without one are skipped."""
    pairs = [(p, mask_dir / f"{p.stem}.png") for p in image_paths]
    missing = [m.name for _, m in pairs if not m.is_file()]
    if len(missing) == len(pairs):
        raise FileNotFoundError(f"no ground-truth mask in {mask_dir} matches the images' names (<stem>.png)")
    if missing:
        log.warning(
            "%d images have no ground-truth mask and are skipped (first: %s)", len(missing), missing[0]
        )
    return [(p, m) for p, m in pairs if m.is_file()]


def _mask_labels(path: Path) -> np.ndarray:
    """The class ids of a palette or grey ground-truth PNG."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path} is a {img.mode} image; masks must be palette or grey PNGs of class ids")
        return np.array(img)


def _image_jaccards(
    masks: np.ndarray, labels: np.ndarray
) -> tuple[list[float], float | None, dict[str, object]]:
    """Each head's foreground Jaccard, the per-object Jaccard (``None`` without objects) and the image's entry."""
    scores = [jaccard(m, labels) for m in masks]
    best = int(np.argmax(scores))
    objects = object_jaccards(masks, labels)
    entry: dict[str, object] = {
        "objects": len(objects),
        "best_heads": {str(obj): int(np.argmax(v)) for obj, v in objects.items()},
        "foreground_best_head": best,
        "foreground_jaccard_best_head": 100 * scores[best],
        "foreground_jaccard_head_mean": 100 * float(np.mean(scores)),
    }
    per_object = None
    if objects:
        per_object = 100 * float(np.mean([v.max() for v in objects.values()]))
        entry["jaccard"] = per_object
    return scores, per_object, entry


def _jaccard_summary(
    per_head: list[list[float]], object_scores: list[float], per_image: dict[str, dict[str, object]]
) -> dict[str, object]:
    """The numbers over the images: the per-object Jaccard and the foreground ones, per head and overall."""
    if len(object_scores) < len(per_image):
        log.warning(
            "%d of %d ground-truth masks have no object (only 0 and 255): left out of the per-object Jaccard",
            len(per_image) - len(object_scores), len(per_image),
        )  # fmt: skip
    table = np.array(per_head)  # [images, heads]
    head_means = table.mean(axis=0)
    return {
        "jaccard": float(np.mean(object_scores)) if object_scores else float("nan"),
        "images_with_objects": len(object_scores),
        "foreground_jaccard_best_head": float(100 * table.max(axis=1).mean()),
        "foreground_jaccard_head_mean": float(100 * table.mean()),
        "foreground_jaccard_best_single_head": float(100 * head_means.max()),
        "foreground_best_single_head": int(head_means.argmax()),
        "foreground_jaccard_per_head": [float(100 * v) for v in head_means],
    }


def attention_jaccard(
    model: VisionTransformer,
    image_paths: Sequence[Path],
    mask_dir: Path,
    device: torch.device,
    image_size: int | None = 480,
    threshold: float = 0.6,
    batch_size: int = 8,
    pictures_dir: Path | None = None,
    progress: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, object]:
    """Jaccard of each head's mass mask with the ground-truth masks of ``mask_dir/<stem>.png``, in percent.

    Images that do not decode are skipped with a warning (:func:`readable_images`).

    Masks are upsampled (nearest) from the patch grid to the ground truth's resolution. ``jaccard`` is the
    paper's number: per object the best head, averaged over the image's objects, then over the images that
    have objects. ``foreground_*``: each head against the whole foreground (void ignored) — the mean over
    images of the best head, of the head average, each head's mean and the best single head.
    """
    from tqdm import tqdm

    pairs = _pairs_with_masks(image_paths, mask_dir)
    per_image: dict[str, dict[str, object]] = {}
    per_head: list[list[float]] = []
    object_scores: list[float] = []
    mask_of = dict(pairs)
    kept: list[Path] = []
    images = readable_images([p for p, _ in pairs], kept)
    results = attention_over_images(model, images, device, image_size, threshold, batch_size, mean, std)
    for result in tqdm(results, total=len(pairs), disable=not progress):
        path = kept[result.index]  # the stream numbers the images that decoded
        labels = _mask_labels(mask_of[path])
        masks = upsample(result.masks, labels.shape[:2]).numpy()
        scores, per_object, entry = _image_jaccards(masks, labels)
        per_head.append(scores)
        if per_object is not None:
            object_scores.append(per_object)
        per_image[path.name] = entry
        if pictures_dir is not None:
            save_attention_pictures(
                result.image, result.attention, result.masks, pictures_dir / path.stem, threshold
            )
    summary = _jaccard_summary(per_head, object_scores, per_image)
    return {
        "images": len(per_image),
        "skipped_undecodable": len(pairs) - len(kept),
        "threshold": threshold,
        **summary,
        "per_image": per_image,
    }
