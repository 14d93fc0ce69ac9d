"""The public loader: a backbone in eval mode, with what defines it, from any name, file or run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dino.hub.errors import WeightsError, Which
from dino.hub.state import check_img_size_applies
from dino.hub.weights import BackboneWeights, load_strict, read_backbone_weights
from dino.models.backbones import RESNETS, build_backbone, convnet_image_size
from dino.models.vision_transformer import VisionTransformer


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
    spec = str(name_or_path)
    if spec.startswith("torchvision:"):
        if img_size is not None:
            check_img_size_applies(spec, img_size)
        return _torchvision_backbone(spec.removeprefix("torchvision:"), random_init)
    weights = read_backbone_weights(
        spec, which, arch=arch, patch_size=patch_size, weights_dir=weights_dir, download=download
    )
    if img_size is not None:
        weights = weights.resampled(img_size)
    loaded = backbone_from_weights(weights, random_init)
    loaded.model.to(device)
    return loaded


def backbone_from_weights(weights: BackboneWeights, random_init: bool = False) -> LoadedBackbone:
    """The backbone ``weights`` belong to, in eval mode on the CPU, with them loaded strictly (or left
    untrained with ``random_init``)."""
    model, dim = build_backbone(weights.arch, weights.patch_size or 16, weights.img_size, 0.0, weights.depth)
    if not random_init:
        load_strict(model, weights.state, weights.source, which=weights.which)
    model.eval()
    source = "random init" if random_init else weights.source
    return LoadedBackbone(
        model, weights.arch, weights.patch_size, dim, source, weights.depth, weights.img_size
    )


def build_untrained(arch: str, patch_size: int = 16, depth: int = 0) -> LoadedBackbone:
    """The architecture ``arch`` untrained, in eval mode, without any weights file: the random-init baseline
    (``patch_size`` and ``depth``, 0 for the standard depth, apply to ViTs). Seed torch's generator first
    for reproducible weights."""
    model, dim = build_backbone(arch, patch_size, 224, 0.0, depth)
    is_vit = arch.startswith("vit_")
    n_blocks = len(model.blocks) if isinstance(model, VisionTransformer) else 0
    size = 224 if is_vit else convnet_image_size(arch)
    return LoadedBackbone(model.eval(), arch, patch_size if is_vit else 0, dim, "random init", n_blocks, size)


def _torchvision_backbone(name: str, random_init: bool) -> LoadedBackbone:
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
