"""The public loaders: a backbone in eval mode, with what defines it, from any name, file or run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dino.hub.errors import WeightsError, Which
from dino.hub.state import check_img_size_applies, resize_pos_embed
from dino.hub.weights import load_strict, read_backbone_weights


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation, with what defines it."""

    model: nn.Module
    arch: str  # vit_small, resnet50, …
    patch_size: int  # 0 for convnets
    embed_dim: int
    source: str  # where the weights came from ("random init" for baselines)
    depth: int = 0
    img_size: int = 224  # the input size it was trained at (ViTs: that of their position embeddings)


def load(
    name_or_path: str | Path,
    *,
    which: Which = "teacher",
    img_size: int | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """A backbone in eval mode from a released name (``dino_vits16``…), a file, a run directory, or
    ``torchvision:NAME`` (with ``random_init`` only).

    ``img_size`` resamples ViT position embeddings to another input size (bicubic). ``random_init`` builds
    the same architecture untrained (the baseline to report every number against).
    """
    from dino.models.backbones import build_backbone

    spec = str(name_or_path)
    if spec.startswith("torchvision:"):
        if img_size is not None:
            check_img_size_applies(spec, img_size)
        return _torchvision_backbone(spec.removeprefix("torchvision:"), random_init)
    weights = read_backbone_weights(
        spec, which, arch=arch, patch_size=patch_size, weights_dir=weights_dir, download=download
    )
    state, size = weights.state, weights.img_size
    if img_size is not None:
        check_img_size_applies(weights.arch, img_size)
        state, size = resize_pos_embed(state, img_size), img_size
    model, dim = build_backbone(weights.arch, weights.patch_size or 16, size, 0.0, weights.depth)
    if not random_init:
        load_strict(model, state, weights.source, which=weights.which)
    model.eval().to(device)
    source = "random init" if random_init else weights.source
    return LoadedBackbone(model, weights.arch, weights.patch_size, dim, source, weights.depth, size)


def load_backbone(
    spec: str | Path,
    which: Which = "teacher",
    random_init: bool = False,
    arch: str | None = None,
    patch_size: int | None = None,
    *,
    img_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """The positional form of :func:`load`, as the evaluation commands call it: ``which``, ``random_init``,
    ``arch`` and ``patch_size`` may be passed by position. Everything else is :func:`load`."""
    return load(
        spec,
        which=which,
        img_size=img_size,
        arch=arch,
        patch_size=patch_size,
        weights_dir=weights_dir,
        download=download,
        random_init=random_init,
        device=device,
    )


def _torchvision_backbone(name: str, random_init: bool) -> LoadedBackbone:
    from dino.models.backbones import RESNETS, build_backbone

    if name not in RESNETS:
        raise WeightsError(f"torchvision backbone {name!r} is not supported; choose one of {RESNETS}")
    if not random_init:
        raise WeightsError(
            f"torchvision:{name} pretrained weights would be downloaded, which dino never does; save them "
            f"with torchvision yourself and pass the file, or add --random-init"
        )
    model, dim = build_backbone(name)
    model.eval()
    return LoadedBackbone(model, name, 0, dim, "random init")
