"""DAVIS video-object-segmentation scores: region similarity J and contour accuracy F, no other repository.

Definitions (Perazzi et al., CVPR 2016; the DAVIS-2017 semi-supervised evaluation):

* **J** (region similarity) of one object in one frame is the IoU of the predicted and ground-truth masks;
  two empty masks score 1. Void pixels (label 255 in the ground truth) count as background, as in the
  DAVIS-2017 semi-supervised evaluation (its ``davis2017-evaluation`` scorer maps 255 to 0 and passes no
  void mask): a prediction over void is a false positive. ``exclude_void=True`` leaves them out instead.
* **F** (contour accuracy) is the F-measure of boundary precision and recall. Boundaries are one-pixel
  maps from :func:`boundary_map` (the classic ``seg2bmap`` thinning) of the masks (with void pixels
  removed when they are excluded); a boundary pixel counts as matched when the other boundary lies within a disk of radius
  ``ceil(0.008 × image diagonal)`` pixels (:func:`boundary_tolerance`). No predicted boundary with a
  ground-truth one gives P = 1, R = 0; the reverse gives P = 0, R = 1; neither gives P = R = 1.
* Objects are the ids ``1..max`` of the first ground-truth frame (255 excluded); a prediction's object
  ``k`` is its pixels labelled ``k``. Only frames ``1 .. N-2`` of an ``N``-frame sequence are scored (the
  first frame is given to the method; the last is excluded as in the DAVIS-2017 evaluation); sequences of
  two frames fall back to scoring frame 1.
* Per object, over its scored frames: mean, recall (fraction of frames above 0.5) and decay (mean of the
  first quarter of the frames minus mean of the last quarter, with the DAVIS binning). The dataset's
  J-mean / F-mean average the per-object means over every object of every sequence; J&F-mean is their
  average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOID_LABEL = 255
BOUNDARY_THRESHOLD = 0.008


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two boolean masks, ignoring ``void`` pixels; 1 when both are empty."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    valid = ~void.astype(bool) if void is not None else np.ones_like(gt)
    union = int(np.count_nonzero((gt | pred) & valid))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(gt & pred & valid)) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask (``seg2bmap``): pixels differing from a right/lower neighbour.

    A pixel is on the boundary when it differs from its east, south or south-east neighbour (pixels beyond
    the image count as background). The last row compares only with east, the last column only with south,
    and the bottom-right pixel is never a boundary, as in the reference definition.
    """
    seg = mask.astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map expects a 2-D mask, got shape {seg.shape}")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_tolerance(height: int, width: int, bound_th: float = BOUNDARY_THRESHOLD) -> int:
    """Matching radius in pixels: ``bound_th`` itself when ≥ 1, else ``ceil(bound_th × diagonal)``."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(height, width)))


def disk(radius: int) -> np.ndarray:
    """Boolean ``(2r+1)²`` disk: offsets (dy, dx) with dy² + dx² ≤ r²."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels (outside the image counts as background).

    Computed exactly as the union, over vertical offsets ``dy``, of the rows dilated horizontally by
    ``floor(sqrt(r² - dy²))`` and shifted by ``dy``: a few 1-D max-pools instead of a 2-D convolution.
    """
    seg = mask.astype(bool)
    if radius <= 0:
        return seg
    height = seg.shape[0]
    rows = torch.from_numpy(seg.astype(np.float32))[None]  # [1, H, W]: max-pool along W for every row
    widened: dict[int, np.ndarray] = {}
    out = np.zeros_like(seg)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in widened:
            widened[half] = (F.max_pool1d(rows, 2 * half + 1, stride=1, padding=half)[0] > 0.5).numpy()
        wide = widened[half]
        if dy >= 0:  # pixel y is reached from a set pixel in row y + dy
            out[: height - dy] |= wide[dy:]
        else:
            out[-dy:] |= wide[: height + dy]
    return out


@dataclass(frozen=True)
class BoundaryScore:
    """Contour precision, recall and F-measure of one object in one frame."""

    precision: float
    recall: float
    f: float


def contour_accuracy(
    gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = BOUNDARY_THRESHOLD
) -> BoundaryScore:
    """F: boundary precision/recall of ``pred`` against ``gt`` with the DAVIS dilation tolerance."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    if gt.shape != pred.shape:
        raise ValueError(f"masks differ in shape: ground truth {gt.shape} vs prediction {pred.shape}")
    if void is not None:
        valid = ~void.astype(bool)
        gt, pred = gt & valid, pred & valid
    radius = boundary_tolerance(gt.shape[0], gt.shape[1], bound_th=bound_th)
    gt_boundary, pred_boundary = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = int(gt_boundary.sum()), int(pred_boundary.sum())
    if n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_pred == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = int(np.count_nonzero(pred_boundary & dilate(gt_boundary, radius))) / n_pred
        recall = int(np.count_nonzero(gt_boundary & dilate(pred_boundary, radius))) / n_gt
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return BoundaryScore(precision, recall, f)


@dataclass(frozen=True)
class Statistics:
    """Mean, recall (fraction above 0.5) and decay of per-frame values of one object."""

    mean: float
    recall: float
    decay: float


def statistics(values: Sequence[float]) -> Statistics:
    """DAVIS statistics of per-frame scores; decay = mean of the first quarter − mean of the last quarter.

    The quarters are the DAVIS bins: edges ``round(linspace(1, n, 5)) - 1``, each bin including both of its
    edges (so neighbouring bins share a frame).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no frame to summarise: a scored sequence needs at least two frames")
    edges = (np.round(np.linspace(1, arr.size, 5) + 1e-10) - 1).astype(int)
    first, last = arr[edges[0] : edges[1] + 1], arr[edges[3] : edges[4] + 1]
    return Statistics(float(arr.mean()), float((arr > 0.5).mean()), float(first.mean() - last.mean()))


@dataclass(frozen=True)
class ObjectScores:
    """Per-frame J and F of one object of one sequence (scored frames only), with their statistics."""

    object_id: int
    frames: tuple[str, ...]
    j: tuple[float, ...]
    f: tuple[float, ...]

    @property
    def j_stats(self) -> Statistics:
        return statistics(self.j)

    @property
    def f_stats(self) -> Statistics:
        return statistics(self.f)


def scored_frame_indices(n_frames: int) -> list[int]:
    """Indices of the frames that count: ``1 .. n-2`` (``[1]`` for two frames); an error for fewer."""
    if n_frames < 2:
        raise ValueError(
            f"a sequence needs at least 2 frames to be scored (the first is given), got {n_frames}"
        )
    return list(range(1, n_frames - 1)) if n_frames > 2 else [1]


def score_sequence(
    gt_frames: Sequence[np.ndarray],
    pred_frames: Sequence[np.ndarray],
    frame_names: Sequence[str] | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    exclude_void: bool = False,
) -> list[ObjectScores]:
    """J and F of every object of one sequence from label maps (ground truth may contain 255 = void:
    background, as the DAVIS scorer counts it, or left out with ``exclude_void``)."""
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} ground-truth frames but {len(pred_frames)} predicted frames")
    names = list(frame_names) if frame_names is not None else [f"{i:05d}" for i in range(len(gt_frames))]
    first = np.asarray(gt_frames[0])
    n_objects = int(first[first != VOID_LABEL].max(initial=0))
    if n_objects == 0:
        raise ValueError(
            "the first ground-truth frame has no object (only background/void): nothing to track"
        )
    indices = scored_frame_indices(len(gt_frames))
    per_object: dict[int, tuple[list[float], list[float]]] = {k: ([], []) for k in range(1, n_objects + 1)}
    for i in indices:
        gt, pred = np.asarray(gt_frames[i]), np.asarray(pred_frames[i])
        if gt.shape != pred.shape:
            raise ValueError(
                f"frame {names[i]}: prediction is {pred.shape[1]}x{pred.shape[0]} but the ground truth is "
                f"{gt.shape[1]}x{gt.shape[0]}; write predictions at the annotation resolution"
            )
        void = gt == VOID_LABEL if exclude_void else None
        for k, (js, fs) in per_object.items():
            js.append(region_similarity(gt == k, pred == k, void))
            fs.append(contour_accuracy(gt == k, pred == k, void, bound_th).f)
    frames = tuple(names[i] for i in indices)
    return [ObjectScores(k, frames, tuple(js), tuple(fs)) for k, (js, fs) in per_object.items()]


def summarize(per_sequence: dict[str, list[ObjectScores]]) -> dict[str, object]:
    """Dataset-level J/F mean, recall and decay (averaged over all objects) and J&F-mean, plus per sequence.

    Scores are reported as fractions in [0, 1], as the DAVIS evaluation prints them.
    """
    objects = [obj for objs in per_sequence.values() for obj in objs]
    if not objects:
        raise ValueError("no sequence was scored")
    j_stats = [o.j_stats for o in objects]
    f_stats = [o.f_stats for o in objects]

    def avg(stats: list[Statistics], field: str) -> float:
        return float(np.mean([getattr(s, field) for s in stats]))

    j_mean, f_mean = avg(j_stats, "mean"), avg(f_stats, "mean")
    sequences: dict[str, object] = {}
    for name, objs in per_sequence.items():
        seq_j = float(np.mean([o.j_stats.mean for o in objs]))
        seq_f = float(np.mean([o.f_stats.mean for o in objs]))
        sequences[name] = {
            "J&F-mean": (seq_j + seq_f) / 2,
            "J-mean": seq_j,
            "F-mean": seq_f,
            "frames_scored": len(objs[0].frames),
            "objects": {str(o.object_id): {"J-mean": o.j_stats.mean, "F-mean": o.f_stats.mean} for o in objs},
        }
    return {
        "J&F-mean": (j_mean + f_mean) / 2,
        "J-mean": j_mean,
        "J-recall": avg(j_stats, "recall"),
        "J-decay": avg(j_stats, "decay"),
        "F-mean": f_mean,
        "F-recall": avg(f_stats, "recall"),
        "F-decay": avg(f_stats, "decay"),
        "objects": len(objects),
        "sequences": sequences,
    }


def read_label_map(path: Path) -> np.ndarray:
    """Palette (or grey-level) PNG as a 2-D array of label ids."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"{path} is a {img.mode} image; masks must be indexed (palette) or grey-level PNGs of label ids"
            )
        return np.array(img)


def evaluate_results(
    davis_root: str | Path,
    results_dir: str | Path,
    sequences: Sequence[str],
    resolution: str = "480p",
    max_frames: int | None = None,
    bound_th: float = BOUNDARY_THRESHOLD,
    exclude_void: bool = False,
) -> dict[str, object]:
    """Score a folder of predicted PNGs (``<results_dir>/<sequence>/<frame>.png``) against DAVIS annotations.

    ``max_frames`` limits each sequence to its first frames (the same limit the predictions were made with);
    ``exclude_void`` leaves void pixels out of J and F (the DAVIS scorer counts them as background).
    """
    annotations = Path(davis_root) / "Annotations" / resolution
    results_dir = Path(results_dir)
    per_sequence: dict[str, list[ObjectScores]] = {}
    for seq in sequences:
        gt_paths = sorted((annotations / seq).glob("*.png"))[:max_frames]
        if not gt_paths:
            raise FileNotFoundError(f"no annotation PNGs in {annotations / seq}; is --data a DAVIS root?")
        missing = [p.name for p in gt_paths[1:] if not (results_dir / seq / p.name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} predicted masks missing in {results_dir / seq} (first: {missing[0]}); "
                "run the segmentation on this sequence first"
            )
        gts = [read_label_map(p) for p in gt_paths]
        preds = [gts[0]] + [read_label_map(results_dir / seq / p.name) for p in gt_paths[1:]]
        per_sequence[seq] = score_sequence(gts, preds, [p.stem for p in gt_paths], bound_th, exclude_void)
    return summarize(per_sequence)
