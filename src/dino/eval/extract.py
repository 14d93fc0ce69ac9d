"""Feature extraction as a reusable step: a folder's features, or a cached feature file, for any evaluation.

``dino extract`` writes a :class:`~dino.eval.features.FeatureSet` file; ``dino knn``, ``dino lowshot`` and the
fast mode of ``dino linear`` accept such files wherever they accept image folders, so a model is run over a
dataset once. Each file records the model and the transform behind it (:func:`model_info`,
:func:`transform_info`), so that features of different models are not compared unawares.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.devices import autocast_dtype_for, resolve_device
from dino.eval.features import DEFAULT_GEM_P, FeatureSet, check_representations, extract_representations
from dino.hub import LoadedBackbone

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".pt", ".pth", ".npz")


def is_feature_file(path: str | Path) -> bool:
    """Whether ``path`` names a cached feature file rather than an image folder."""
    path = Path(path).expanduser()
    return path.suffix in FEATURE_SUFFIXES and not path.is_dir()


def model_info(loaded: LoadedBackbone) -> dict[str, Any]:
    """Plain-data description of a loaded backbone, for results and feature files."""
    return {
        "arch": loaded.arch,
        "patch_size": loaded.patch_size,
        "embed_dim": loaded.embed_dim,
        "depth": num_blocks(loaded.model),
        "source": loaded.source,
    }


def num_blocks(model: torch.nn.Module) -> int:
    """Transformer blocks of a ViT (0 for other backbones)."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else 0


def transform_info(transform: EvalTransform) -> dict[str, Any]:
    """Plain-data description of an evaluation transform."""
    return {
        "resize": transform.resize,
        "crop_size": transform.crop_size,
        "mean": list(transform.mean),
        "std": list(transform.std),
    }


def extract_folder(
    loaded: LoadedBackbone,
    folder: str | Path,
    transform: EvalTransform,
    device: str | torch.device,
    representations: Sequence[str],
    batch_size: int = 128,
    num_workers: int = 0,
    gem_p: float = DEFAULT_GEM_P,
    labelled: bool | None = None,
    desc: str = "features",
    precision: str = "auto",
) -> FeatureSet:
    """Features of every image under ``folder`` (class sub-folders give labels) in each representation."""
    check_representations(loaded.model, representations)
    dataset = ImageFolderDataset(folder, transform=transform, labelled=labelled)
    device = resolve_device(device)
    meta = {
        "folder": str(Path(folder).expanduser().resolve()),
        "model": model_info(loaded),
        "transform": transform_info(transform),
        "gem_p": gem_p,
        "precision": "bf16" if autocast_dtype_for(device, precision) is not None else "fp32",
    }
    start = time.perf_counter()
    features = extract_representations(
        loaded.model,
        dataset,
        device,
        representations,
        batch_size=batch_size,
        num_workers=num_workers,
        autocast_dtype=autocast_dtype_for(device, precision),
        gem_p=gem_p,
        meta=meta,
        desc=desc,
    )
    elapsed = time.perf_counter() - start
    features.meta["seconds"] = elapsed
    skipped = len(dataset) - len(features)
    log.info(
        "%s: %d images in %.1f s (%.1f images/s)%s",
        folder,
        len(features),
        elapsed,
        len(features) / max(elapsed, 1e-9),
        f", {skipped} undecodable skipped" if skipped else "",
    )
    return features


def check_same_model(train: FeatureSet, test: FeatureSet) -> None:
    """Warn when cached train and test features come from different models or transforms."""
    for key in ("model", "transform"):
        if key in train.meta and key in test.meta and train.meta[key] != test.meta[key]:
            log.warning(
                "train and test features were made with different %s settings: %s vs %s",
                key,
                train.meta[key],
                test.meta[key],
            )
