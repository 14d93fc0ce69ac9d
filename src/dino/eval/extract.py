"""Feature extraction as a reusable step: a folder's features, or a cached feature file, for any evaluation.

``dino extract`` writes a :class:`~dino.eval.features.FeatureSet` file; ``dino knn``, ``dino lowshot`` and the
fast mode of ``dino linear`` accept such files wherever they accept image folders, so a model is run over a
dataset once. :class:`FeatureProvider` hides which of the two a user gave and loads the model only when an
image folder actually needs it.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.eval.common import (
    autocast_dtype_for,
    eval_transform_from_args,
    model_from_args,
    model_info,
    resolve_device,
    transform_info,
)
from dino.eval.features import DEFAULT_GEM_P, FeatureSet, check_representations, extract_representations
from dino.hub import LoadedBackbone

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".pt", ".pth", ".npz")


def is_feature_file(path: str | Path) -> bool:
    """Whether ``path`` names a cached feature file rather than an image folder."""
    path = Path(path).expanduser()
    return path.suffix in FEATURE_SUFFIXES and not path.is_dir()


def extract_folder(
    loaded: LoadedBackbone,
    folder: str | Path,
    transform: EvalTransform,
    device,
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


class FeatureProvider:
    """Features for the evaluation commands, from image folders (through the model) or cached files.

    The model and its transform are loaded on first use, so evaluations of cached files need no weights.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._loaded: LoadedBackbone | None = None
        self._transform: EvalTransform | None = None

    @property
    def model_loaded(self) -> bool:
        """Whether the model has run (some source was an image folder)."""
        return self._loaded is not None

    @property
    def loaded(self) -> LoadedBackbone:
        if self._loaded is None:
            self._loaded = model_from_args(self.args)
            log.info("model: %s", model_info(self._loaded))
        return self._loaded

    @property
    def transform(self) -> EvalTransform:
        if self._transform is None:
            self._transform = eval_transform_from_args(self.args, self.loaded)
        return self._transform

    def get(self, source: str | Path, representations: Sequence[str], desc: str) -> FeatureSet:
        """A labelled feature set from a feature file or an image folder with class sub-folders."""
        if is_feature_file(source):
            features = FeatureSet.load(source)
            for name in representations:
                features.get(name)  # fails early, naming the stored representations
        else:
            if not Path(source).expanduser().is_dir():
                raise FileNotFoundError(f"{source} is neither an image folder nor a .pt/.npz feature file")
            features = extract_folder(
                self.loaded,
                source,
                self.transform,
                self.args.device,
                representations,
                self.args.batch_size,
                self.args.num_workers,
                getattr(self.args, "gem_p", DEFAULT_GEM_P),
                labelled=True,
                desc=desc,
                precision=getattr(self.args, "precision", "auto"),
            )
        if not features.labelled:
            raise ValueError(f"{source} has no labels; give a folder with one sub-folder per class")
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
