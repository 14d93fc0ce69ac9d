"""Copy detection on INRIA Copydays with frozen features: [CLS] ⊕ GeM-pooled patch tokens, whitening, cosine.

Protocol (the paper's, after Berman et al.'s Multigrain):

* Layout: ``original/`` (the database), and query blocks ``strong/``, ``jpegqual/<quality>/`` and
  ``crops/<percent>/``; every block found is evaluated (``original`` itself is a sanity check scoring 100).
  A query's positives are the originals with the same file stem; when there is none (Copydays' ``strong``
  images), the originals sharing the first ``group_chars`` (4) characters, Copydays' image-group id.
* Images are read as the original ``eval_copy_detection.py`` reads them (the pixels as stored: no EXIF
  rotation; ``exif_transpose=True`` applies it) and resized to ``imsize`` × ``imsize`` (320, bicubic). A ViT's descriptor is its final [CLS] token
  concatenated with GeM pooling (p = 4) of its final patch tokens (clamped at 1e-6); a torchvision ResNet's
  is GeM (p = 4) of its last feature map. The GeM is :func:`dino.eval.features.gem_pool`, so ``dino extract
  --representations cls+gem`` (``gem`` for a ResNet) stores the same descriptor.
* Optional distractors (another folder) are added to the database.
* Optional whitening learned on a separate folder: descriptors are centred with that folder's mean,
  projected on the eigenvectors of its second-moment matrix and divided by ``sqrt(max(λ, 1e-5 · λ_max))``
  (the reference's floor for tiny eigenvalues); then L2-normalised. ``whitening="reference"`` (the default)
  does what the original ``eval_copy_detection.py`` does, which the paper's numbers come from: the matrix
  is that of the *uncentred* whitening descriptors (``Fᵀ F / n``) and every dimension is kept.
  ``whitening="centred"`` is textbook PCA whitening: the covariance of the centred descriptors, at most
  ``n - 1`` components for ``n`` images (more would only amplify directions the folder never showed).
* Ranking by cosine similarity; each query's AP (trapezoid rule, as for revisited Oxford/Paris) counts the
  positives within the first ``max_rank`` results (20 in the reference; 0: the whole database). mAP per block.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dino.data.datasets import IMAGE_EXTENSIONS
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dino.eval.features import DEFAULT_GEM_P, gem_pool, resnet_feature_map
from dino.eval.images import ImageFileDataset
from dino.eval.retrieval import average_precision
from dino.eval.sharding import gather_rows, my_share
from dino.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)

EIGENVALUE_FLOOR = 1e-5


# --- Layout ----------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _numeric_key(path: Path) -> tuple[int, str]:
    return (int(path.name), path.name) if re.fullmatch(r"\d+", path.name) else (10**9, path.name)


@dataclass(frozen=True)
class CopydaysLayout:
    """The originals and the query blocks (name → images) of a Copydays-style folder."""

    originals: list[Path]
    blocks: dict[str, list[Path]]

    @classmethod
    def read(cls, root: str | Path) -> CopydaysLayout:
        root = Path(root).expanduser()
        if not (root / "original").is_dir():
            raise FileNotFoundError(
                f"{root} has no original/ folder; a Copydays root holds original/, strong/, …"
            )
        originals = _images_in(root / "original")
        if not originals:
            raise FileNotFoundError(f"{root / 'original'} holds no image")
        blocks: dict[str, list[Path]] = {"original": originals}
        if (root / "strong").is_dir():
            blocks["strong"] = _images_in(root / "strong")
        for family in ("jpegqual", "crops"):
            if (root / family).is_dir():
                for sub in sorted((p for p in (root / family).iterdir() if p.is_dir()), key=_numeric_key):
                    blocks[f"{family}/{sub.name}"] = _images_in(sub)
        return cls(originals, {name: paths for name, paths in blocks.items() if paths})


def positives_for(query: Path, originals: Sequence[Path], group_chars: int = 4) -> list[int]:
    """Indices of a query's originals: the same stem, else the same ``group_chars``-character prefix."""
    same = [i for i, o in enumerate(originals) if o.stem == query.stem]
    if same:
        return same
    group = [i for i, o in enumerate(originals) if o.stem[:group_chars] == query.stem[:group_chars]]
    if not group:
        raise ValueError(
            f"query {query.name} matches no original (neither the stem {query.stem!r} nor the prefix "
            f"{query.stem[:group_chars]!r}); name copies after their original"
        )
    return group


# --- Descriptors -----------------------------------------------------------------------------------------


class SquareImages(ImageFileDataset):
    """Images resized to ``imsize`` × ``imsize`` (bicubic) and normalised; read without EXIF rotation unless
    ``exif_transpose``, as the original script reads them."""

    def __init__(
        self,
        paths: Sequence[Path],
        imsize: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        exif_transpose: bool = False,
    ) -> None:
        super().__init__(paths, mean, std, exif_transpose)
        self.imsize = imsize

    def __getitem__(self, index: int) -> Tensor:
        return self.normalized(self.load(index).resize((self.imsize, self.imsize), Image.Resampling.BICUBIC))


def check_descriptor_support(model: nn.Module) -> None:
    """Refuse, before any work, a backbone whose copy-detection descriptor is not defined here."""
    if not isinstance(model, VisionTransformer) and not hasattr(model, "layer4"):
        raise ValueError(f"copy detection needs a ViT or a torchvision ResNet, not {type(model).__name__}")


@torch.no_grad()
def copy_descriptor(model: nn.Module, images: Tensor) -> Tensor:
    """[CLS] ⊕ GeM(p=4) of the patch tokens for a ViT; GeM(p=4) of the last feature map for a ResNet."""
    if isinstance(model, VisionTransformer):
        tokens = model.forward_features(images).float()
        return torch.cat([tokens[:, 0], gem_pool(tokens[:, 1:], DEFAULT_GEM_P, dim=1)], dim=1)
    check_descriptor_support(model)
    return gem_pool(resnet_feature_map(model, images).float().flatten(2), DEFAULT_GEM_P, dim=2)


@torch.no_grad()
def descriptors(
    model: nn.Module,
    paths: Sequence[Path],
    device: torch.device,
    imsize: int = 320,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "images",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    exif_transpose: bool = False,
) -> Tensor:
    """Raw (unnormalised) copy-detection descriptors of ``paths``, [N, D] on the CPU.

    Under torchrun every process calls this: each computes its block of ``paths`` and gets every row, in
    order (:mod:`dino.eval.sharding`).
    """
    from tqdm import tqdm

    images = SquareImages(my_share(list(paths)), imsize, mean, std, exif_transpose)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    out = [
        copy_descriptor(model, batch.to(device)).cpu()
        for batch in tqdm(loader, desc=desc, disable=not progress)
    ]
    return gather_rows(torch.cat(out) if out else torch.empty(0))


# --- Whitening -------------------------------------------------------------------------------------------


WhiteningKind = Literal["reference", "centred"]
WHITENING_KINDS: tuple[str, ...] = ("reference", "centred")


@dataclass(frozen=True)
class PCAWhitening:
    """``x ↦ (x - mean) @ projection.T``; rows of ``projection`` are eigenvectors / sqrt(eigenvalue)."""

    mean: Tensor  # [D]
    projection: Tensor  # [d, D]
    eigenvalues: Tensor  # [d], kept, largest first (after the floor)
    energy: float  # fraction of the variance kept

    @classmethod
    def fit(
        cls,
        features: Tensor,
        dim: int | None = None,
        floor: float = EIGENVALUE_FLOOR,
        kind: WhiteningKind = "reference",
    ) -> PCAWhitening:
        """Learn the whitening from [n, D] features; keeps ``dim`` components (default: D for the reference's
        whitening, ``min(D, n - 1)`` for the centred one). See the module's notes for the two kinds."""
        n, d_in = features.shape
        if n < 2:
            raise ValueError(f"whitening needs at least 2 images, got {n}")
        if kind not in WHITENING_KINDS:
            raise ValueError(f"whitening must be one of {WHITENING_KINDS}, got {kind!r}")
        if dim is not None and dim < 1:
            raise ValueError(f"the whitening keeps at least 1 component, got dim={dim}")
        x = features.double()
        mean = x.mean(dim=0)
        basis = x if kind == "reference" else x - mean
        cov = basis.T @ basis / n
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        total = float(eigenvalues.clamp_min(0).sum())
        keep = min(dim or d_in, d_in) if kind == "reference" else min(dim or d_in, d_in, n - 1)
        eigenvalues = eigenvalues.clamp_min(floor * float(eigenvalues[0]))[:keep]
        eigenvectors = eigenvectors[:, :keep]
        projection = eigenvectors.T / eigenvalues.sqrt()[:, None]
        energy = float(eigenvalues.sum()) / total if total > 0 else 1.0
        return cls(mean.float(), projection.float(), eigenvalues.float(), energy)

    def apply(self, features: Tensor) -> Tensor:
        return (features - self.mean) @ self.projection.T


# --- The protocol ----------------------------------------------------------------------------------------


def block_average_precisions(
    similarity: Tensor, positives: Sequence[Sequence[int]], max_rank: int = 20
) -> np.ndarray:
    """AP of each query row of ``similarity`` [Q, N] given its positive database indices."""
    depth = similarity.shape[1] if max_rank <= 0 else min(max_rank, similarity.shape[1])
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :depth].numpy()
    aps = np.zeros(len(positives))
    for q, pos in enumerate(positives):
        ranks = np.nonzero(np.isin(order[q], np.asarray(pos)))[0]
        aps[q] = average_precision(ranks, len(pos))
    return aps


def _whitened(
    database: Tensor,
    queries: dict[str, Tensor],
    whitening_descriptors: Tensor,
    dim: int | None,
    kind: WhiteningKind,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Any]]:
    """The database and queries whitened with a PCA fitted on ``whitening_descriptors``, and what it kept."""
    whitening = PCAWhitening.fit(whitening_descriptors, dim, kind=kind)
    if whitening.projection.shape[0] < database.shape[1]:
        log.info("whitening keeps %d of %d dimensions", whitening.projection.shape[0], database.shape[1])
    database = whitening.apply(database)
    queries = {name: whitening.apply(q) for name, q in queries.items()}
    info = {
        "kind": kind,
        "images": len(whitening_descriptors),
        "dim": int(whitening.projection.shape[0]),
        "energy_kept": whitening.energy,
    }
    return database, queries, info


def _block_scores(
    blocks: dict[str, list[Path]],
    queries: dict[str, Tensor],
    database: Tensor,
    positives: dict[str, list[list[int]]],
    max_rank: int,
) -> dict[str, Any]:
    """mAP per query block (``strong``'s and the transformed blocks' mean apart) and each query's AP."""
    database = F.normalize(database, dim=1)
    block_map: dict[str, float] = {}
    per_query: dict[str, dict[str, float]] = {}
    for name in blocks:
        aps = block_average_precisions(
            F.normalize(queries[name], dim=1) @ database.T, positives[name], max_rank
        )
        block_map[name] = 100 * float(aps.mean())
        per_query[name] = {p.name: 100 * float(ap) for p, ap in zip(blocks[name], aps, strict=True)}
    results: dict[str, Any] = {"mAP": block_map}
    if "strong" in block_map:
        results["mAP_strong"] = block_map["strong"]
    transformed = [v for k, v in block_map.items() if k != "original"]
    if transformed:
        results["mAP_mean_transformed_blocks"] = float(np.mean(transformed))
    results["per_query"] = per_query
    return results


def evaluate_copydays(
    model: nn.Module,
    root: str | Path,
    device: torch.device,
    imsize: int = 320,
    whiten_dir: str | Path | None = None,
    whiten_dim: int | None = None,
    distractor_dir: str | Path | None = None,
    max_rank: int = 20,
    group_chars: int = 4,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    whitening_kind: WhiteningKind = "reference",
    exif_transpose: bool = False,
) -> dict[str, Any]:
    """mAP (percent) per query block, the ``strong`` block's being the paper's number."""
    check_descriptor_support(model)
    layout = CopydaysLayout.read(root)
    positives = {
        name: [positives_for(q, layout.originals, group_chars) for q in paths]
        for name, paths in layout.blocks.items()
    }
    distractors = _folder_images(distractor_dir, "--distractors") if distractor_dir else []
    whitening_images = _folder_images(whiten_dir, "--whiten-dir") if whiten_dir else []

    def embed(paths: Sequence[Path], desc: str) -> Tensor:
        return descriptors(
            model, paths, device, imsize, batch_size, num_workers, progress, desc, mean, std, exif_transpose
        )

    database = embed(layout.originals + distractors, "database")
    queries = {name: embed(paths, name) for name, paths in layout.blocks.items() if name != "original"}
    queries["original"] = database[: len(layout.originals)]
    results: dict[str, Any] = {
        "database": {"originals": len(layout.originals), "distractors": len(distractors)},
        "descriptor_dim": int(database.shape[1]),
    }
    if whitening_images:
        white = embed(whitening_images, "whitening")
        database, queries, results["whitening"] = _whitened(
            database, queries, white, whiten_dim, whitening_kind
        )
    results.update(_block_scores(layout.blocks, queries, database, positives, max_rank))
    return results


def _folder_images(folder: str | Path, option: str) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"{option} {folder} holds no image")
    return images
