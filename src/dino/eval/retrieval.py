"""Landmark retrieval on revisited Oxford and Paris (Radenović et al., CVPR 2018) with frozen global features.

Protocol, as in the revisitop evaluation:

* The ground truth ``gnd_<dataset>.pkl`` holds ``imlist`` (database names), ``qimlist`` (query names) and,
  per query, ``bbx`` (its region of interest) and ``easy`` / ``hard`` / ``junk`` database indices. It is read
  with :func:`load_ground_truth`, which only accepts plain data (no code can run from the file).
* Setups: **Easy** positives = easy, junk = junk ∪ hard; **Medium** positives = easy ∪ hard, junk = junk;
  **Hard** positives = hard, junk = junk ∪ easy. Queries without positives are left out of the averages.
* Junk images are removed from each query's ranking before scoring. With ``r_1 < r_2 < …`` the 0-based
  ranks of the positives in that junk-free list and ``n`` the number of positives,
  ``AP = Σ_j (P0_j + P1_j) / 2n`` with ``P0_j = j / r_j`` (1 when ``r_j = 0``) and ``P1_j = (j + 1) / (r_j + 1)``
  (:func:`average_precision`; the trapezoid rule of the Holidays/revisitop code).
* ``mP@k`` uses revisitop's convention: with ``R`` the 1-based junk-free rank of the *last* positive,
  ``k' = min(k, R)`` and ``P@k = #{positives with rank ≤ k'} / k'``. (So a query whose every positive is
  retrieved in the first ``R < k`` places scores 1, not ``n/k``.)

Features: queries are used whole, as the DINO script that produced the paper's retrieval table does
(``crop_queries=True`` crops them to their ``bbx`` first: the revisitop protocol, which other papers
report; the two are not comparable), read as that script reads them (the pixels as stored: no EXIF
rotation; ``exif_transpose=True`` applies it), shrunk so that the long side is at most ``imsize`` (PIL
``thumbnail`` with Lanczos, as the script does: smaller images keep their size; ``upscale=True`` enlarges
them, bicubic), normalised, and embedded by the backbone's global output ([CLS] for a ViT, the pooled vector for a ResNet). With ``multiscale``, the
outputs at scales 1, 1/√2 and 1/2 (bilinear resize of the input tensor) are averaged. Features are
L2-normalised and database images ranked by cosine similarity.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino.eval.images import ImageFileDataset
from dino.eval.sharding import gather_rows, process_block

PROTOCOLS = ("easy", "medium", "hard")
MULTISCALE_FACTORS = (1.0, 1 / math.sqrt(2), 0.5)

# --- Ground truth ----------------------------------------------------------------------------------------

_SAFE_GLOBALS = (
    {
        (module, name)
        for module in ("builtins", "__builtin__")  # protocol-2 pickles name the module __builtin__
        for name in (
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "int",
            "float",
            "complex",
            "str",
            "bytes",
            "bool",
        )
    }
    | {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode")}
)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds containers, numbers, strings and numpy arrays, and refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: ground-truth files hold plain data only"
        )


def load_plain_pickle(path: str | Path) -> Any:
    """Read a pickle that may only contain plain data (dicts, lists, numbers, strings, numpy arrays)."""
    data = Path(path).read_bytes()
    return _PlainDataUnpickler(io.BytesIO(data), encoding="latin1").load()


@dataclass(frozen=True)
class QueryTruth:
    """One query's region of interest and the database indices of each label."""

    bbx: tuple[float, float, float, float] | None
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class GroundTruth:
    """A revisited Oxford/Paris ground truth: database names, query names, per-query labels."""

    imlist: list[str]
    qimlist: list[str]
    queries: list[QueryTruth]

    def setup(self, protocol: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positives, junk) index arrays per query for ``easy``, ``medium`` or ``hard``."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
        out = []
        for q in self.queries:
            if protocol == "easy":
                out.append((q.easy, np.concatenate([q.junk, q.hard])))
            elif protocol == "medium":
                out.append((np.concatenate([q.easy, q.hard]), q.junk))
            else:
                out.append((q.hard, np.concatenate([q.junk, q.easy])))
        return out


def _indices(value: Any, what: str, n: int) -> np.ndarray:
    arr = np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{what} holds index {int(arr.max())} outside the database of {n} images")
    return arr


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read and validate a revisitop ``gnd_*.pkl`` (plain data only; see :func:`load_plain_pickle`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file {path} does not exist")
    try:
        raw = load_plain_pickle(path)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} is not a plain-data ground-truth pickle: {err}") from err
    if not isinstance(raw, dict) or not {"imlist", "qimlist", "gnd"} <= set(raw):
        raise ValueError(f"{path} is not a revisitop ground truth (a dict with imlist, qimlist and gnd)")
    imlist, qimlist, gnd = list(raw["imlist"]), list(raw["qimlist"]), list(raw["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(qimlist)} queries but {len(gnd)} ground-truth entries")
    queries = []
    for i, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{path}: gnd[{i}] is not a dict with easy/hard/junk")
        bbx = g.get("bbx")
        box = tuple(float(v) for v in np.asarray(bbx).reshape(-1)) if bbx is not None else None
        if box is not None and len(box) != 4:
            raise ValueError(f"{path}: gnd[{i}]['bbx'] must hold 4 numbers (x1, y1, x2, y2)")
        n = len(imlist)
        queries.append(
            QueryTruth(
                box,
                _indices(g.get("easy"), f"gnd[{i}]['easy']", n),
                _indices(g.get("hard"), f"gnd[{i}]['hard']", n),
                _indices(g.get("junk"), f"gnd[{i}]['junk']", n),
            )
        )
    return GroundTruth([str(s) for s in imlist], [str(s) for s in qimlist], queries)


# --- Metrics ---------------------------------------------------------------------------------------------


def average_precision(positive_ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """Trapezoid-rule AP from the sorted 0-based ranks of the retrieved positives (see the module doc)."""
    ap = 0.0
    for j, rank in enumerate(positive_ranks):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) / (2 * n_positives)
    return ap


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` once junk images are removed (sorted)."""
    is_junk = np.isin(ranking, junk)
    is_positive = np.isin(ranking, positives)
    junk_before: np.ndarray = np.cumsum(is_junk) - is_junk  # junk images strictly above each position
    return (np.arange(ranking.size) - junk_before)[is_positive]


@dataclass(frozen=True)
class RankingScores:
    """mAP and mean precision at each k (fractions), with the per-query values (NaN: no positive)."""

    map: float
    precision_at: dict[int, float]
    aps: np.ndarray
    precisions: np.ndarray  # [queries, len(ks)]


def score_rankings(
    rankings: np.ndarray, truth: Sequence[tuple[np.ndarray, np.ndarray]], ks: Sequence[int] = (1, 5, 10)
) -> RankingScores:
    """Score ``rankings`` ([queries, database]: database indices best first) against (positives, junk)."""
    if rankings.shape[0] != len(truth):
        raise ValueError(f"{rankings.shape[0]} rankings for {len(truth)} queries")
    aps = np.full(len(truth), np.nan)
    precisions = np.full((len(truth), len(ks)), np.nan)
    for q, (positives, junk) in enumerate(truth):
        if positives.size == 0:
            continue
        ranks = positive_ranks(rankings[q], positives, junk)
        aps[q] = average_precision(ranks, positives.size)
        if ranks.size == 0:
            precisions[q] = 0.0
            continue
        one_based = ranks + 1
        for i, k in enumerate(ks):
            kq = min(int(one_based.max()), k)
            precisions[q, i] = np.count_nonzero(one_based <= kq) / kq
    scored = ~np.isnan(aps)
    if not scored.any():
        raise ValueError("no query has a positive image in this setup: nothing to score")
    return RankingScores(
        float(aps[scored].mean()),
        {k: float(precisions[scored, i].mean()) for i, k in enumerate(ks)},
        aps,
        precisions,
    )


# --- Features --------------------------------------------------------------------------------------------


def resize_long_side(image: Image.Image, imsize: int, upscale: bool = False) -> Image.Image:
    """Shrink with ``thumbnail`` (Lanczos) so the longer side is at most ``imsize``, as the DINO script
    does; ``upscale`` also enlarges smaller images (bicubic) to a longer side of ``imsize``."""
    if max(image.size) > imsize:
        image = image.copy()
        image.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
        return image
    if upscale and max(image.size) < imsize:
        scale = imsize / max(image.size)
        width, height = (max(1, round(side * scale)) for side in image.size)
        return image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def crop_box(image: Image.Image, bbx: Sequence[float]) -> Image.Image:
    """Crop to ``(x1, y1, x2, y2)`` rounded to whole pixels and clipped to the image."""
    x1, y1, x2, y2 = (int(round(v)) for v in bbx)
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(image.width, x2), min(image.height, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bounding box {tuple(bbx)} is empty inside a {image.width}x{image.height} image")
    return image.crop((x1, y1, x2, y2))


class RetrievalImages(ImageFileDataset):
    """Images of a list of paths (optionally cropped), resized by the long side (:func:`resize_long_side`)
    and normalised; read without EXIF rotation unless ``exif_transpose``, as the DINO script reads them."""

    def __init__(
        self,
        paths: Sequence[Path],
        imsize: int,
        boxes: Sequence[Sequence[float] | None] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        upscale: bool = False,
        exif_transpose: bool = False,
    ) -> None:
        super().__init__(paths, mean, std, exif_transpose)
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        self.imsize = imsize
        self.upscale = upscale

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        image = self.load(index)
        box = self.boxes[index]
        if box is not None:
            image = crop_box(image, box)
        return index, self.normalized(resize_long_side(image, self.imsize, self.upscale))


def batches_by_size(
    items: Iterable[tuple[int, Tensor]], batch_size: int, max_pending: int | None = None
) -> Iterator[tuple[list[int], Tensor]]:
    """Group (index, image) pairs into batches of equally sized images.

    A size's batch is emitted when full; when more than ``max_pending`` images (default ``4 × batch_size``)
    wait in partial batches, the largest partial batch is emitted, so memory stays bounded whatever the mix
    of sizes. What remains is emitted at the end.
    """
    limit = max_pending or 4 * batch_size
    pending: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    waiting = 0

    def emit(key: tuple[int, ...]) -> tuple[list[int], Tensor]:
        nonlocal waiting
        group = pending.pop(key)
        waiting -= len(group)
        return [i for i, _ in group], torch.stack([t for _, t in group])

    for index, image in items:
        key = tuple(image.shape)
        pending.setdefault(key, []).append((index, image))
        waiting += 1
        if len(pending[key]) >= batch_size:
            yield emit(key)
        elif waiting > limit:
            yield emit(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        yield emit(key)


def _unbatched(batch: list[tuple[int, Tensor]]) -> tuple[int, Tensor]:
    return batch[0]


@torch.no_grad()
def global_features(
    model: nn.Module,
    dataset: RetrievalImages,
    device: torch.device,
    batch_size: int = 32,
    num_workers: int = 0,
    multiscale: bool = False,
    progress: bool = False,
) -> Tensor:
    """L2-normalised global descriptors [N, D] of every image (optionally averaged over 3 scales), on the CPU.

    Under torchrun every process calls this: each embeds its block of the images and gets every row, in
    order (:mod:`dino.eval.sharding`).
    """
    from tqdm import tqdm

    block = process_block(len(dataset))
    mine = Subset(dataset, block)
    loader = DataLoader(mine, batch_size=1, num_workers=num_workers, collate_fn=_unbatched)
    features: Tensor | None = None
    bar = tqdm(total=len(mine), desc="images", disable=not progress, leave=False)
    for indices, images in batches_by_size(loader, batch_size):
        images = images.to(device)
        out = None
        for scale in MULTISCALE_FACTORS if multiscale else (1.0,):
            inp = (
                images
                if scale == 1.0
                else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            feats = model(inp).float()
            out = feats if out is None else out + feats
        assert out is not None
        out = F.normalize(out, dim=1).cpu()
        if features is None:
            features = torch.zeros(len(mine), out.shape[1])
        features[torch.tensor(indices) - block.start] = out
        bar.update(len(indices))
    bar.close()
    gathered = gather_rows(features if features is not None else torch.empty(0))
    if len(dataset) == 0 or gathered.shape[0] != len(dataset):
        raise ValueError("no image to embed")
    return gathered


# --- The protocol ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RevisitedDataset:
    """Where a revisited Oxford/Paris dataset lives: its image folder and ground-truth file."""

    name: str
    images: Path
    ground_truth: Path

    @classmethod
    def locate(cls, data: str | Path, dataset: str | None = None) -> RevisitedDataset:
        """Accept ``<root>/<dataset>/{jpg/, gnd_<dataset>.pkl}`` given the root or the dataset folder."""
        data = Path(data).expanduser()
        if dataset:
            folders = [data / dataset, data]
        else:
            folders = [data] + (sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else [])
        found = [
            p
            for folder in folders
            if folder.is_dir()
            for p in sorted(folder.glob("gnd_*.pkl"))
            if dataset is None or p.stem == f"gnd_{dataset}"
        ]
        if len(found) > 1 and dataset is None:
            names = ", ".join(p.stem.removeprefix("gnd_") for p in found)
            raise ValueError(f"{data} holds several datasets ({names}); pick one with --dataset")
        if not found:
            raise FileNotFoundError(
                f"no gnd_{dataset or '<name>'}.pkl found in {data}"
                + (f" or {data / dataset}" if dataset else " or its sub-folders")
                + "; use the revisitop layout <root>/<dataset>/{jpg/, gnd_<dataset>.pkl} or pass --gnd and --images"
            )
        gnd = found[0]
        images = gnd.parent / "jpg" if (gnd.parent / "jpg").is_dir() else gnd.parent
        return cls(gnd.stem.removeprefix("gnd_"), images, gnd)


def image_paths(folder: Path, names: Sequence[str], suffix: str = ".jpg") -> list[Path]:
    """``folder/<name><suffix>`` for every name, or an error naming how many are missing."""
    paths = [folder / f"{name}{suffix}" for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images are missing in {folder} (first: {missing[0].name})"
        )
    return paths


def rank_database(database: Tensor, queries: Tensor) -> np.ndarray:
    """[queries, database] indices by decreasing cosine similarity (features already L2-normalised)."""
    similarity = queries @ database.T
    return torch.argsort(similarity, dim=1, descending=True, stable=True).numpy()


def evaluate_retrieval(
    model: nn.Module,
    images: Path,
    truth: GroundTruth,
    device: torch.device,
    imsize: int = 224,
    multiscale: bool = False,
    crop_queries: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    upscale: bool = False,
    exif_transpose: bool = False,
) -> dict[str, Any]:
    """Embed database and queries, rank, and score every setup; percentages, as revisitop prints them.

    Images are read as the DINO script reads them unless ``upscale`` / ``exif_transpose`` (see the module
    notes)."""
    db_paths = image_paths(images, truth.imlist)
    q_paths = image_paths(images, truth.qimlist)
    boxes = [q.bbx for q in truth.queries] if crop_queries else None
    reading = {"upscale": upscale, "exif_transpose": exif_transpose}
    database = global_features(
        model,
        RetrievalImages(db_paths, imsize, None, mean, std, **reading),
        device,
        batch_size,
        num_workers,
        multiscale,
        progress,
    )
    queries = global_features(
        model,
        RetrievalImages(q_paths, imsize, boxes, mean, std, **reading),
        device,
        batch_size,
        num_workers,
        multiscale,
        progress,
    )
    return _protocol_scores(rank_database(database, queries), truth, ks)


def _protocol_scores(rankings: np.ndarray, truth: GroundTruth, ks: Sequence[int]) -> dict[str, Any]:
    """mAP and mP@k of every protocol, and each query's AP under each, in percent."""
    results: dict[str, Any] = {}
    per_query: dict[str, dict[str, float | None]] = {name: {} for name in truth.qimlist}
    for protocol in PROTOCOLS:
        scores = score_rankings(rankings, truth.setup(protocol), ks)
        results[protocol] = {
            "mAP": 100 * scores.map,
            **{f"mP@{k}": 100 * v for k, v in scores.precision_at.items()},
        }
        for name, ap in zip(truth.qimlist, scores.aps, strict=True):
            per_query[name][f"AP_{protocol}"] = None if np.isnan(ap) else 100 * float(ap)
    results["per_query"] = per_query
    return results
