"""Semi-supervised video object segmentation by label propagation with frozen ViT patch features.

The DAVIS-2017 protocol of the paper (after Jabri et al., 2020): the first frame's annotation is given; every
later frame takes its labels from a context of the first frame and the ``n_last_frames`` (7) frames before
it. For each target patch, the affinity to a context patch is ``exp(cos / T)`` (T = 0.1) of their L2-normalised
last-layer patch tokens, restricted to context patches within ``neighborhood`` (12) patches in both
directions; only the ``topk`` (5) strongest affinities over the whole context are kept and normalised to
sum to one, and the target's soft labels are the weighted sum of the context's soft labels. Predictions are
upsampled bilinearly by the patch size, each label channel is min-max normalised (as the reference code
does), the arg-max is taken and resized (nearest) to the annotation resolution, and saved as an indexed
PNG with the dataset's palette. :func:`dino.eval.davis_metrics.evaluate_results` scores them.

Frames are normalised with the original ``eval_video_segmentation.py``'s constants (:data:`DAVIS_MEAN`,
:data:`DAVIS_STD`: a std of 0.228 in the first channel where ImageNet's is 0.229), which the paper's DAVIS
numbers come from. Frames are resized (bilinear) so that their short side is ``short_side`` (480) and the long side is the
largest multiple of ``size_multiple`` (64 when the patch size divides it, as in the reference; else the
patch size) not above the aspect-preserving length.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from dino.eval.davis_metrics import VOID_LABEL, evaluate_results, read_label_map
from dino.eval.images import ImageFileDataset, image_tensor
from dino.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

# The original DAVIS script normalises frames with its own constants, not ImageNet's (std 0.228, not 0.229,
# in the first channel); the paper's DAVIS numbers come from it, so they are the default here.
DAVIS_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DAVIS_STD: tuple[float, float, float] = (0.228, 0.224, 0.225)


@dataclass(frozen=True)
class PropagationSettings:
    """Label-propagation hyper-parameters (defaults: the paper's DAVIS protocol)."""

    n_last_frames: int = 7
    topk: int = 5
    neighborhood: int = 12  # patches in each direction; 0 disables the restriction
    temperature: float = 0.1
    short_side: int = 480
    size_multiple: int | None = None  # None: 64 when divisible by the patch size, else the patch size

    def __post_init__(self) -> None:
        if self.n_last_frames < 0 or self.topk < 1 or self.neighborhood < 0 or self.temperature <= 0:
            raise ValueError(
                "propagation needs n_last_frames >= 0, topk >= 1, neighborhood >= 0 and temperature > 0, got "
                f"{self.n_last_frames}, {self.topk}, {self.neighborhood}, {self.temperature}"
            )


def require_vit(model: torch.nn.Module, protocol: str) -> VisionTransformer:
    """The model as a :class:`VisionTransformer`, or a clear error: dense protocols read patch tokens."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"{protocol} needs a Vision Transformer (it reads patch tokens / attention), but the model is a "
            f"{type(model).__name__}; pass ViT weights (vit_tiny/small/base/large/giant)"
        )
    return model


def processing_size(
    height: int, width: int, patch_size: int, settings: PropagationSettings
) -> tuple[int, int]:
    """(height, width) a frame is resized to: short side ``short_side``, long side rounded down."""
    multiple = settings.size_multiple or (64 if 64 % patch_size == 0 else patch_size)
    if multiple % patch_size:
        raise ValueError(f"size multiple {multiple} is not a multiple of the patch size {patch_size}")
    short = settings.short_side - settings.short_side % patch_size
    if short < patch_size:
        raise ValueError(f"short side {settings.short_side} is smaller than the patch size {patch_size}")
    long_exact = short * max(height, width) / min(height, width)
    long = max(int(long_exact // multiple) * multiple, patch_size)
    return (short, long) if height <= width else (long, short)


class FrameDataset(ImageFileDataset):
    """Video frames resized to ``size`` (bilinear, no antialiasing) and normalised, in file order.

    Frames are decoded with PIL's plain RGB conversion (no EXIF rotation, no pixel limit), not with
    :meth:`ImageFileDataset.load`, and resized as tensors before normalisation.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        size: tuple[int, int],
        mean: Sequence[float] = DAVIS_MEAN,
        std: Sequence[float] = DAVIS_STD,
    ) -> None:
        super().__init__(paths, mean, std)
        self.size = size

    def __getitem__(self, index: int) -> Tensor:
        with Image.open(self.paths[index]) as img:
            pixels = image_tensor(img.convert("RGB"))
        pixels = F.interpolate(pixels[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return self.normalized(pixels)


@torch.no_grad()
def patch_features(model: VisionTransformer, frames: Tensor) -> Tensor:
    """L2-normalised last-layer patch tokens, [B, h·w, D] ([CLS] dropped)."""
    tokens = model.forward_features(frames)[:, 1:]
    return F.normalize(tokens.float(), dim=-1)


SIMILARITY_BLOCK = 2**25  # source × target similarities computed at once (128 MB in float32)


def neighborhood_mask(
    h: int, w: int, radius: int, device: torch.device, targets: range | None = None
) -> Tensor | None:
    """[h·w sources, targets] booleans: True where the two patches are at most ``radius`` apart on each axis.

    ``targets`` restricts the columns to a range of target patches (default: all); ``radius`` 0 means no
    restriction (None).
    """
    if radius <= 0:
        return None
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    cols = slice(targets.start, targets.stop) if targets is not None else slice(None)
    return ((ys[:, None] - ys[None, cols]).abs() <= radius) & ((xs[:, None] - xs[None, cols]).abs() <= radius)


def propagate(
    target: Tensor,
    context_features: Sequence[Tensor],
    context_labels: Sequence[Tensor],
    settings: PropagationSettings,
    grid: tuple[int, int],
    block: int = SIMILARITY_BLOCK,
) -> Tensor:
    """Soft labels [K, N] of a target frame from its context.

    ``target`` is [N, D] (N = h·w of ``grid``) and each context frame has features [N, D] and soft labels
    [K, N]. Affinities ``exp(cos / T)`` outside the neighbourhood are zero; per target patch, the affinities
    below its ``topk``-th largest over all context frames are dropped and the rest normalised to sum to one.
    Target patches are processed in chunks of at most ``block`` similarities per context frame, and the
    top-k is taken per context frame first (the overall top-k is among those), so memory stays bounded
    whatever the resolution.
    """
    n = target.shape[0]
    chunk = max(1, block // max(n, 1))
    out = []
    for start in range(0, n, chunk):
        cols = range(start, min(n, start + chunk))
        mask = neighborhood_mask(*grid, settings.neighborhood, target.device, cols)
        out.append(
            _propagate_columns(target[start : cols.stop], context_features, context_labels, settings, mask)
        )
    return torch.cat(out, dim=1)


def _propagate_columns(
    target: Tensor,
    context_features: Sequence[Tensor],
    context_labels: Sequence[Tensor],
    settings: PropagationSettings,
    mask: Tensor | None,
) -> Tensor:
    k = settings.topk
    values, labels = [], []
    for feats, soft in zip(context_features, context_labels, strict=True):
        sim = feats @ target.T  # [N_source, N_target]
        if mask is not None:
            sim = sim.masked_fill(~mask, float("-inf"))
        top, idx = sim.topk(min(k, sim.shape[0]), dim=0)  # [k, N_target]
        values.append(top)
        labels.append(soft[:, idx])  # [K, k, N_target]
    values_all = torch.cat(values)  # [C·k, N_target]
    labels_all = torch.cat(labels, dim=1)  # [K, C·k, N_target]
    kth = values_all.topk(min(k, values_all.shape[0]), dim=0).values[-1:]
    keep = values_all >= kth
    # exp((s - max) / T) is exp(s / T) up to a per-target factor that the normalisation removes.
    weights = torch.exp((values_all - values_all.max(dim=0, keepdim=True).values) / settings.temperature)
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=0, keepdim=True)
    return (labels_all * weights[None]).sum(dim=1)


def one_hot_labels(label_map: np.ndarray, n_classes: int) -> Tensor:
    """[K, h·w] one-hot labels of a small label map; void (255) pixels get no label at all."""
    labels = torch.from_numpy(label_map.astype(np.int64)).flatten()
    onehot = torch.zeros(n_classes, labels.numel())
    valid = labels != VOID_LABEL
    onehot[labels[valid], torch.nonzero(valid).flatten()] = 1.0
    return onehot


def labels_to_mask(
    soft: Tensor, grid: tuple[int, int], patch_size: int, out_size: tuple[int, int]
) -> np.ndarray:
    """Arg-max label map at ``out_size`` (height, width) from soft patch labels [K, h·w] (reference post-processing)."""
    k = soft.shape[0]
    up = F.interpolate(soft.view(1, k, *grid), scale_factor=patch_size, mode="bilinear", align_corners=False)[
        0
    ]
    lo = up.flatten(1).min(dim=1).values.view(k, 1, 1)
    hi = up.flatten(1).max(dim=1).values.view(k, 1, 1)
    # Each channel with any mass is rescaled to [0, 1] before the arg-max, as in the reference code.
    shifted = up - lo
    span = shifted.flatten(1).max(dim=1).values.view(k, 1, 1)
    up = torch.where(hi > 0, shifted / span.clamp_min(1e-12), up)
    labels = up.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(labels).resize((out_size[1], out_size[0]), Image.Resampling.NEAREST))


def segment_video(
    model: VisionTransformer,
    frame_paths: Sequence[Path],
    first_annotation: np.ndarray,
    settings: PropagationSettings,
    device: torch.device,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = False,
    mean: Sequence[float] = DAVIS_MEAN,
    std: Sequence[float] = DAVIS_STD,
) -> Iterator[np.ndarray]:
    """Label maps (annotation resolution) of frames ``1..`` of a video, propagated from ``first_annotation``.

    Frames are decoded and embedded in batches; propagation then runs frame by frame in order.
    """
    from tqdm import tqdm

    patch = model.patch_size
    with Image.open(frame_paths[0]) as img:
        width, height = img.size
    out_size = first_annotation.shape[:2]
    size = processing_size(height, width, patch, settings)
    grid = (size[0] // patch, size[1] // patch)
    valid = first_annotation[first_annotation != VOID_LABEL]
    n_classes = int(valid.max(initial=0)) + 1
    small = np.array(
        Image.fromarray(first_annotation.astype(np.uint8)).resize(
            (grid[1], grid[0]), Image.Resampling.NEAREST
        )
    )
    first_labels = one_hot_labels(small, n_classes).to(device)
    loader = DataLoader(
        FrameDataset(frame_paths, size, mean, std), batch_size=batch_size, num_workers=num_workers
    )
    queue: deque[tuple[Tensor, Tensor]] = deque(maxlen=settings.n_last_frames or None)
    first_features: Tensor | None = None
    bar = tqdm(total=len(frame_paths), desc="frames", disable=not progress, leave=False)
    for batch in loader:
        features = patch_features(model, batch.to(device))
        for feats in features:
            bar.update(1)
            if first_features is None:
                first_features = feats
                continue
            context = [(first_features, first_labels), *queue]
            soft = propagate(feats, [c[0] for c in context], [c[1] for c in context], settings, grid)
            if settings.n_last_frames:
                queue.append((feats, soft))
            yield labels_to_mask(soft, grid, patch, out_size)
    bar.close()


def read_palette(davis_root: Path, first_annotation: Path) -> list[int]:
    """768 palette values: the dataset's ``palette.txt``, else the first annotation's, else the DAVIS/VOC one."""
    text = davis_root / "palette.txt"
    if text.is_file():
        rows = [line.split() for line in text.read_text().splitlines() if line.strip()]
        values = [int(v) for row in rows for v in row[:3]]
        if len(values) % 3 or not all(0 <= v <= 255 for v in values):
            raise ValueError(f"{text} must hold lines of three 0-255 values 'R G B'")
        return (values + [0] * 768)[:768]
    with Image.open(first_annotation) as img:
        palette = img.getpalette() if img.mode == "P" else None
    return (palette + [0] * 768)[:768] if palette else default_palette()


def default_palette() -> list[int]:
    """The DAVIS/PASCAL colour map, computed (label bits spread over the high bits of R, G and B)."""
    values = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        values += [r, g, b]
    return values


def write_indexed_png(path: Path, labels: np.ndarray, palette: Sequence[int]) -> None:
    """Save a label map as a palette PNG (label ids are the pixel values)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(list(palette))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def list_sequences(
    davis_root: Path, resolution: str = "480p", split: str = "val", year: str = "2017"
) -> list[str]:
    """Sequence names of ``ImageSets/<year>/<split>.txt``, else every folder of ``JPEGImages/<resolution>``."""
    listing = davis_root / "ImageSets" / year / f"{split}.txt"
    if listing.is_file():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    frames = davis_root / "JPEGImages" / resolution
    if not frames.is_dir():
        raise FileNotFoundError(
            f"{frames} does not exist; --data must be a DAVIS root (JPEGImages/, Annotations/)"
        )
    return sorted(p.name for p in frames.iterdir() if p.is_dir())


def sequence_frames(davis_root: Path, sequence: str, resolution: str, max_frames: int | None) -> list[Path]:
    """The sequence's JPEG frames in order (at most ``max_frames``), with a clear error when missing."""
    folder = davis_root / "JPEGImages" / resolution / sequence
    frames = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:max_frames]
    if len(frames) < 2:
        raise FileNotFoundError(
            f"{folder} has {len(frames)} frame(s); a sequence needs at least 2 to propagate"
        )
    annotation = davis_root / "Annotations" / resolution / sequence / f"{frames[0].stem}.png"
    if not annotation.is_file():
        raise FileNotFoundError(f"first-frame annotation {annotation} is missing")
    labels = np.unique(read_label_map(annotation))
    objects = labels[(labels != 0) & (labels != VOID_LABEL)]
    if objects.size == 0:
        hint = (
            " (0/255 masks: DAVIS-2016's binary format, where 255 is the object; here 255 is void as in "
            "DAVIS-2017: write the object as 1)"
            if VOID_LABEL in labels
            else ""
        )
        raise ValueError(f"the first-frame annotation {annotation} has no object to propagate{hint}")
    return frames


def segment_davis(
    model: VisionTransformer,
    davis_root: str | Path,
    output_dir: str | Path,
    sequences: Sequence[str],
    settings: PropagationSettings,
    device: torch.device,
    resolution: str = "480p",
    max_frames: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    mean: Sequence[float] = DAVIS_MEAN,
    std: Sequence[float] = DAVIS_STD,
) -> None:
    """Write ``<output_dir>/<sequence>/<frame>.png`` for every frame of every sequence (frame 0: the annotation)."""
    from tqdm import tqdm

    davis_root, output_dir = Path(davis_root), Path(output_dir)
    model = require_vit(model, "video segmentation")
    frames_by_seq = {seq: sequence_frames(davis_root, seq, resolution, max_frames) for seq in sequences}
    annotations = davis_root / "Annotations" / resolution
    palette = read_palette(
        davis_root, annotations / sequences[0] / f"{frames_by_seq[sequences[0]][0].stem}.png"
    )
    for seq in tqdm(sequences, desc="sequences", disable=not progress):
        frames = frames_by_seq[seq]
        first = read_label_map(annotations / seq / f"{frames[0].stem}.png")
        write_indexed_png(output_dir / seq / f"{frames[0].stem}.png", first, palette)
        masks = segment_video(
            model, frames, first, settings, device, batch_size, num_workers, progress, mean, std
        )
        for path, labels in zip(frames[1:], masks, strict=True):
            write_indexed_png(output_dir / seq / f"{path.stem}.png", labels, palette)
        log.debug("segmented %s (%d frames)", seq, len(frames))


def evaluate_davis(
    model: VisionTransformer,
    davis_root: str | Path,
    output_dir: str | Path,
    sequences: Sequence[str],
    settings: PropagationSettings,
    device: torch.device,
    resolution: str = "480p",
    max_frames: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
    mean: Sequence[float] = DAVIS_MEAN,
    std: Sequence[float] = DAVIS_STD,
    exclude_void: bool = False,
) -> dict[str, object]:
    """Segment every sequence, then score the written PNGs with J and F (see :mod:`dino.eval.davis_metrics`)."""
    check_scorable(Path(davis_root), sequences, resolution, max_frames)
    segment_davis(
        model,
        davis_root,
        output_dir,
        sequences,
        settings,
        device,
        resolution,
        max_frames,
        batch_size,
        num_workers,
        progress,
        mean,
        std,
    )
    return evaluate_results(
        davis_root, output_dir, sequences, resolution, max_frames, exclude_void=exclude_void
    )


def check_scorable(
    davis_root: Path, sequences: Sequence[str], resolution: str, max_frames: int | None
) -> None:
    """Scoring needs ground truth beyond the first frame: refuse sequences without it before any work."""
    for seq in sequences:
        folder = davis_root / "Annotations" / resolution / seq
        count = len(sorted(folder.glob("*.png"))[:max_frames])
        if count < 2:
            raise ValueError(
                f"{folder} has {count} annotation(s): scoring needs ground truth beyond the first frame "
                "(a test split?); pass --no-score to only write the predicted masks"
            )
