"""Frozen features of a backbone over an image folder, in the representations the paper evaluates.

A representation is named by ``+``-joined parts, concatenated in order:

* ``cls``: the output [CLS] token after the final norm (the pooled output for a ResNet);
* ``cls_last{n}``: the [CLS] tokens of the last ``n`` blocks, each through the final norm, concatenated
  (``cls_last4`` is the paper's linear-probe feature for ViT-S; ``cls_last1`` equals ``cls``);
* ``mean``: the mean of the final patch tokens (global average pooling for a ResNet);
* ``gem``: generalised-mean pooling of the final patch tokens, ``(mean(clamp(x, eps)^p))^(1/p)`` with
  p = 4 by default (:func:`gem_pool`, which copy detection uses too).

So ``cls+mean`` is the paper's ViT-B linear feature and ``cls+gem`` a ViT's copy-detection descriptor (for a
ResNet, ``gem`` is), the same numbers as :func:`dino.eval.copy_detection.copy_descriptor` gives on the same
images. Every requested representation comes from one forward pass per batch. :class:`FeatureSet` holds the
result with the file paths, labels and class names, and saves to / loads from ``.pt`` (loadable with
``weights_only=True``, memory-mapped when read back) or ``.npz``.
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dino.checkpoint import write_atomically
from dino.data.datasets import collate_skipping_bad
from dino.eval.sharding import gather_rows, my_share

FEATURE_FILE_FORMAT = "dino-features"
FEATURE_FILE_VERSION = 1
DEFAULT_GEM_P = 4.0  # the paper's copy-detection GeM (after Berman et al.'s Multigrain)
GEM_EPS = 1e-6
_PART = re.compile(r"^(cls(?:_last(\d+))?|mean|gem)$")


@dataclass(frozen=True)
class Representation:
    """A parsed representation name: ``parts`` are ``("cls", n)``, ``("mean", 0)`` or ``("gem", 0)``."""

    name: str
    parts: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, name: str) -> Representation:
        parts = []
        for token in name.split("+"):
            match = _PART.match(token.strip())
            if not match:
                raise ValueError(
                    f"unknown feature representation {name!r}: use '+'-joined parts among cls, cls_last<n>, mean, gem"
                )
            if match.group(1).startswith("cls"):
                n = int(match.group(2) or 1)
                if n < 1:
                    raise ValueError(f"cls_last{n} in {name!r}: the number of blocks must be at least 1")
                parts.append(("cls", n))
            else:
                parts.append((match.group(1), 0))
        return cls(name, tuple(parts))

    @property
    def blocks_needed(self) -> int:
        """How many final blocks' outputs this representation reads (at least 1)."""
        return max([n for kind, n in self.parts if kind == "cls"] + [1])

    def dim(self, embed_dim: int) -> int:
        """Feature length for a backbone of width ``embed_dim``."""
        return sum(embed_dim * n if kind == "cls" else embed_dim for kind, n in self.parts)


def linear_representation(n_last_blocks: int, avgpool_patchtokens: bool) -> str:
    """The linear probe's feature: [CLS] of the last ``n`` blocks, optionally + mean patch token."""
    if n_last_blocks < 1:
        raise ValueError(f"--n-last-blocks must be at least 1, got {n_last_blocks}")
    name = "cls" if n_last_blocks == 1 else f"cls_last{n_last_blocks}"
    return name + ("+mean" if avgpool_patchtokens else "")


def paper_linear_representation(embed_dim: int, depth: int) -> str:
    """The paper's choice: last-4 [CLS] for ViT-S-sized models, last [CLS] + mean patch for ViT-B and wider.

    ``depth`` is the number of ViT blocks (0 for a ResNet, which uses its pooled output); a ViT with fewer
    than 4 blocks uses all of them.
    """
    if depth == 0:
        return "cls"
    if embed_dim >= 768:
        return "cls+mean"
    return linear_representation(min(4, depth), False)


def default_representations(model: nn.Module) -> list[str]:
    """What ``dino extract`` saves by default: cls, cls_last4 (or all blocks), cls+mean, gem (ViT)."""
    depth = _vit_depth(model)
    if depth == 0:
        return ["cls", "gem"] if _feature_map_fn(model) is not None else ["cls"]
    n = min(4, depth)
    names = ["cls"] + ([f"cls_last{n}"] if n > 1 else []) + ["cls+mean", "gem"]
    return names


class _TokenModel(Protocol):
    """A ViT (this package's, timm's): its blocks, and the normalised tokens of the last ``n`` of them."""

    blocks: Sized

    def get_intermediate_layers(self, x: Tensor, n: int) -> Sequence[Tensor]: ...


def _as_vit(model: nn.Module) -> _TokenModel | None:
    """``model`` as a ViT when it has blocks and ``get_intermediate_layers``, else None."""
    if hasattr(model, "get_intermediate_layers") and isinstance(getattr(model, "blocks", None), Sized):
        return cast(_TokenModel, model)
    return None


def _vit_depth(model: nn.Module) -> int:
    vit = _as_vit(model)
    return len(vit.blocks) if vit is not None else 0


def check_representations(model: nn.Module, names: Sequence[str]) -> list[Representation]:
    """Parse ``names`` and check that ``model`` can produce them, before any image is read."""
    reps = [Representation.parse(n) for n in names]
    if not reps:
        raise ValueError("no feature representation requested")
    depth = _vit_depth(model)
    for rep in reps:
        if depth:
            if rep.blocks_needed > depth:
                raise ValueError(
                    f"representation {rep.name!r} needs the last {rep.blocks_needed} blocks but the model has {depth}"
                )
            continue
        if rep.blocks_needed > 1:
            raise ValueError(
                f"representation {rep.name!r} needs transformer blocks; this backbone is not a ViT"
            )
        needs_map = any(kind in ("mean", "gem") for kind, _ in rep.parts)
        if needs_map and _feature_map_fn(model) is None:
            raise ValueError(
                f"representation {rep.name!r} needs patch features, which this backbone does not expose; use cls"
            )
    return reps


def gem_pool(tokens: Tensor, p: float = DEFAULT_GEM_P, eps: float = GEM_EPS, dim: int = 1) -> Tensor:
    """Generalised mean ``(mean_i clamp(x_i, eps)^p)^(1/p)`` over ``dim`` (the tokens of [B, N, D] by default).

    The one GeM of the package: ``dino extract``'s ``gem`` part and the copy-detection descriptor both use it.
    """
    return tokens.clamp(min=eps).pow(p).mean(dim=dim).pow(1.0 / p)


@torch.no_grad()
def compute_representations(
    backbone: nn.Module, images: Tensor, reps: Sequence[Representation], gem_p: float = DEFAULT_GEM_P
) -> dict[str, Tensor]:
    """Each representation of a batch of images, from one forward pass."""
    vit = _as_vit(backbone)
    if vit is not None and len(vit.blocks):
        n = max(rep.blocks_needed for rep in reps)
        layers = vit.get_intermediate_layers(images, n)  # oldest first, each through the final norm
        final = layers[-1]
        cls_tokens = [layer[:, 0] for layer in layers]
        patch_tokens = final[:, 1:]
    else:
        feature_map = _feature_map_fn(backbone)
        if feature_map is None:
            features = backbone(images)
            return {rep.name: features for rep in reps}
        fmap = feature_map(images)  # [B, D, H, W]
        patch_tokens = fmap.flatten(2).transpose(1, 2)
        cls_tokens = [patch_tokens.mean(dim=1)]
    pooled: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    for rep in reps:
        pieces = []
        for kind, k in rep.parts:
            if kind == "cls":
                pieces.extend(cls_tokens[-k:])
            else:  # pooled patch tokens, computed once per batch however many representations use them
                if kind not in pooled:
                    pooled[kind] = (
                        patch_tokens.mean(dim=1) if kind == "mean" else gem_pool(patch_tokens.float(), gem_p)
                    )
                pieces.append(pooled[kind])
        out[rep.name] = torch.cat([p.float() for p in pieces], dim=1)
    return out


_RESNET_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet_feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """The final [B, D, H, W] feature map of a torchvision ResNet (stem, then ``layer1`` … ``layer4``)."""
    x = images
    for name in _RESNET_STAGES:
        x = model.get_submodule(name)(x)
    return x


def _feature_map_fn(model: nn.Module):
    """A function giving the final [B, D, H, W] feature map of a torchvision ResNet, else None."""
    if not all(hasattr(model, name) for name in _RESNET_STAGES):
        return None
    return partial(resnet_feature_map, model)


@dataclass
class FeatureSet:
    """Features of a folder: one [N, D] tensor per representation, with paths, labels and class names.

    ``labels`` index ``classes`` (``-1`` for an unlabelled folder). ``meta`` is plain data describing the
    model and the transform.
    """

    features: dict[str, Tensor]
    labels: Tensor
    paths: list[str]
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.labels.shape[0] != n or any(f.shape[0] != n for f in self.features.values()):
            raise ValueError("features, labels and paths of a FeatureSet must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and bool((self.labels >= 0).all())

    def get(self, name: str) -> Tensor:
        """The features of one representation, with an error listing the stored ones."""
        if name not in self.features:
            raise ValueError(
                f"representation {name!r} is not in these features (stored: {', '.join(self.features)}); "
                "re-extract with --representations or pick a stored one"
            )
        return self.features[name]

    def only(self, *names: str) -> FeatureSet:
        """The same rows with only the representations ``names`` (their tensors shared, not copied).

        Call it before :meth:`subset` when one representation is used: subsetting copies every stored one.
        """
        return FeatureSet(
            {name: self.get(name) for name in names},
            self.labels,
            list(self.paths),
            list(self.classes),
            dict(self.meta),
        )

    def subset(self, indices: Tensor | Sequence[int]) -> FeatureSet:
        """The rows ``indices`` (same classes, same meta) of every stored representation, copied."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FeatureSet(
            {k: v[idx] for k, v in self.features.items()},
            self.labels[idx],
            [self.paths[i] for i in idx.tolist()],
            list(self.classes),
            dict(self.meta),
        )

    def relabelled(self, classes: Sequence[str]) -> FeatureSet:
        """The same set with labels re-indexed into ``classes`` (e.g. a test folder onto the train folder's)."""
        if list(classes) == self.classes:
            return self
        index = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in self.classes if c not in index]
        if unknown:
            raise ValueError(
                f"classes {unknown[:5]} of the evaluation set are not among the training classes; "
                "the test folder may only hold class folders that the training folder has"
            )
        mapping = torch.tensor([index[c] for c in self.classes], dtype=torch.long)
        return FeatureSet(
            dict(self.features), mapping[self.labels], list(self.paths), list(classes), dict(self.meta)
        )

    def save(self, path: str | Path) -> Path:
        """Write to ``.pt`` (tensors and plain data) or ``.npz`` (arrays, meta as JSON), atomically."""
        path = Path(path).expanduser()
        meta = {"format": FEATURE_FILE_FORMAT, "version": FEATURE_FILE_VERSION}
        if path.suffix == ".npz":
            # Any: np.savez's stub types the arrays given by name like its allow_pickle flag
            arrays: dict[str, Any] = {f"feature:{k}": v.numpy() for k, v in self.features.items()}
            arrays.update(
                labels=self.labels.numpy(),
                paths=np.array(self.paths, dtype=np.str_),
                classes=np.array(self.classes, dtype=np.str_),
                meta=np.array(json.dumps({**meta, **self.meta})),
            )
            write_atomically(path, lambda fh: np.savez(fh, **arrays))
        elif path.suffix in (".pt", ".pth"):
            content = {
                **meta,
                "features": {k: v.contiguous() for k, v in self.features.items()},
                "labels": self.labels,
                "paths": list(self.paths),
                "classes": list(self.classes),
                "meta": self.meta,
            }
            write_atomically(path, lambda fh: torch.save(content, fh))
        else:
            raise ValueError(f"feature file {path} must end in .pt or .npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a file written by :meth:`save` (no code is ever executed while loading).

        A ``.pt`` file (torch's zip format, what :meth:`save` writes) is memory-mapped: a representation's
        bytes are read from disk only when used, so the unused ones of a large file cost no memory. A
        ``.npz`` file is read whole.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"feature file {path} does not exist; create it with `dino extract`")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                _check_format(meta.pop("format", None), path)
                meta.pop("version", None)
                features = {
                    k.removeprefix("feature:"): torch.from_numpy(data[k])
                    for k in data
                    if k.startswith("feature:")
                }
                return cls(
                    features,
                    torch.from_numpy(data["labels"]).long(),
                    [str(p) for p in data["paths"]],
                    [str(c) for c in data["classes"]],
                    meta,
                )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:
            raise ValueError(f"cannot read {path} as a feature file ({type(err).__name__}: {err})") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is not a feature file written by `dino extract`")
        _check_format(obj.get("format"), path)
        return cls(
            dict(obj["features"]), obj["labels"].long(), list(obj["paths"]), list(obj["classes"]), obj["meta"]
        )


def _check_format(fmt: Any, path: Path) -> None:
    if fmt != FEATURE_FILE_FORMAT:
        raise ValueError(f"{path} is not a feature file written by `dino extract` (format {fmt!r})")


class _Indexed(Dataset):
    """Items ``indices`` of an image-folder dataset, with the sample index in place of the label."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, int] | None:
        index = self.indices[position]
        item = self.dataset[index]
        return None if item is None else (item[0], index)


def show_progress() -> bool:
    """Progress bars only when a person watches: stderr is a terminal."""
    return sys.stderr.isatty()


@torch.no_grad()
def _representations_of_loader(
    backbone: nn.Module,
    loader: DataLoader,
    device: torch.device,
    reps: Sequence[Representation],
    gem_p: float,
    autocast_dtype: torch.dtype | None,
    desc: str,
) -> tuple[dict[str, list[Tensor]], list[int]]:
    """Each representation's float32 CPU batches over ``loader`` (the backbone in eval mode meanwhile) and
    the dataset indices of the images that decoded, in order."""
    from tqdm import tqdm

    chunks: dict[str, list[Tensor]] = {rep.name: [] for rep in reps}
    kept: list[int] = []
    was_training = backbone.training
    backbone.eval()
    try:
        for images, batch_indices, _ in tqdm(loader, desc=desc, disable=not show_progress(), leave=False):
            if len(batch_indices) == 0:
                continue
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = compute_representations(backbone, images, reps, gem_p)
            for name, value in out.items():
                chunks[name].append(value.float().cpu())
            kept.extend(batch_indices.tolist())
    finally:
        backbone.train(was_training)
    return chunks, kept


def extract_representations(
    backbone: nn.Module,
    dataset: Dataset,
    device: torch.device,
    representations: Sequence[str],
    batch_size: int = 128,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    gem_p: float = DEFAULT_GEM_P,
    meta: dict[str, Any] | None = None,
    desc: str = "features",
    indices: Sequence[int] | None = None,
) -> FeatureSet:
    """Features of every decodable image (or of the samples ``indices``) of an image-folder dataset.

    The dataset needs ``samples`` ((path, label) pairs) and ``classes``, as :class:`ImageFolderDataset` has.
    Undecodable files are skipped (and absent from ``paths``); features are float32 on the CPU.

    Under torchrun (``torch.distributed`` initialised, several processes) every process must call this with
    the same arguments: each extracts its block of the images and every process gets all the rows, in
    dataset order (:mod:`dino.eval.sharding`).
    """
    reps = check_representations(backbone, representations)
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise TypeError(
            "extract_representations needs a dataset with .samples (path, label), e.g. ImageFolderDataset"
        )
    positions = list(range(len(samples))) if indices is None else list(indices)
    loader = DataLoader(
        _Indexed(dataset, my_share(positions)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        pin_memory=device.type == "cuda",
    )
    chunks, mine = _representations_of_loader(backbone, loader, device, reps, gem_p, autocast_dtype, desc)
    features = {
        name: gather_rows(torch.cat(parts) if parts else torch.empty(0)) for name, parts in chunks.items()
    }
    kept = gather_rows(torch.tensor(mine, dtype=torch.long)).tolist()
    if not kept:
        raise ValueError("no image could be decoded for feature extraction; check the folder")
    return FeatureSet(
        features,
        torch.tensor([int(samples[i][1]) for i in kept], dtype=torch.long),
        [str(samples[i][0]) for i in kept],
        list(getattr(dataset, "classes", [])),
        dict(meta or {}),
    )


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Backbone outputs ([CLS] for a ViT, pooled output for a ResNet) and labels of an image-folder dataset.

    The training loop's online k-NN monitor uses this; it is :func:`extract_representations` for ``cls``.
    """
    features = extract_representations(
        backbone, dataset, device, ["cls"], batch_size, num_workers, autocast_dtype
    )
    return features.features["cls"], features.labels
