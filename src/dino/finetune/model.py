"""The network a fine-tuning run trains: a pretrained backbone and a new linear classifier, and the
optimiser's parameter groups with layer-wise learning-rate decay.

The backbone comes from anything ``--weights`` accepts elsewhere (:func:`dino.hub.read_backbone_weights`:
our runs and checkpoints, exports, released files and names), rebuilt with stochastic depth and loaded
strictly; ``random_init`` keeps the same architecture untrained, the baseline every number is reported
against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from dino.hub import BackboneWeights, load_strict
from dino.models.backbones import build_backbone, is_resnet
from dino.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    """What rebuilds the backbone: architecture, patch size (0 for convnets), input size, ViT depth."""

    arch: str
    patch_size: int
    img_size: int
    depth: int


class Classifier(nn.Module):
    """``head(backbone(x))``: the backbone's image embedding ([CLS] for a ViT, pooled for a ResNet) through
    one linear layer to the class logits."""

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int, head_init_std: float = 0.01):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(
    weights: BackboneWeights | BackboneSpec,
    num_classes: int,
    img_size: int,
    drop_path_rate: float = 0.0,
    head_init_std: float = 0.01,
    seed: int = 0,
) -> tuple[Classifier, BackboneSpec]:
    """The classifier for ``img_size`` inputs: the backbone of ``weights`` (ViT position embeddings
    resampled to ``img_size``), or an untrained one of the architecture ``weights`` describes (a
    :class:`BackboneSpec`: the random-init baseline), and a new head; every random draw from ``seed``."""
    arch = weights.arch
    if arch.startswith("timm:"):
        raise ValueError(f"fine-tuning builds dino's own backbones; {arch} is a timm model: export it first")
    is_vit = arch.startswith("vit_")
    if is_vit and img_size % weights.patch_size:
        raise ValueError(
            f"data.img_size={img_size} is not a multiple of the patch size {weights.patch_size}; choose one"
        )
    size = img_size if is_vit else weights.img_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, dim = build_backbone(arch, weights.patch_size or 16, size, drop_path_rate, weights.depth)
        model = Classifier(backbone, dim, num_classes, head_init_std)
    if isinstance(weights, BackboneWeights):
        if is_vit and weights.img_size != img_size:
            weights = weights.resampled(img_size)
        load_strict(backbone, weights.state, weights.source, which=weights.which)
    depth = len(backbone.blocks) if isinstance(backbone, VisionTransformer) else 0
    return model, BackboneSpec(arch, weights.patch_size if is_vit else 0, size, depth)


def num_layers(model: Classifier) -> int:
    """How many layers layer-wise decay counts below the head: ViT blocks, or ResNet stages."""
    backbone = model.backbone
    if isinstance(backbone, VisionTransformer):
        return len(backbone.blocks)
    return sum(1 for name, _ in backbone.named_children() if re.fullmatch(r"layer\d+", name))


def layer_id(name: str, depth: int) -> int:
    """The layer of parameter ``name`` (a :class:`Classifier` name) for layer-wise decay: the embeddings
    (patch embedding, [CLS], position embeddings; a ResNet's stem) are layer 0, ViT block ``i`` (ResNet
    stage ``layer{i+1}``) is ``i + 1``, the final norm and the head are ``depth + 1``."""
    if name.startswith("head."):
        return depth + 1
    inner = name.removeprefix("backbone.")
    if inner.startswith(("cls_token", "pos_embed", "patch_embed.", "conv1.", "bn1.")):
        return 0
    block = re.match(r"blocks\.(\d+)\.", inner)
    if block:
        return int(block.group(1)) + 1
    stage = re.match(r"layer(\d+)\.", inner)
    if stage:
        return int(stage.group(1))
    return depth + 1  # the final norm (and anything after the last block)


def _no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (1-D) and the ViT's [CLS] and position embeddings are not decayed (DeiT)."""
    return param.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))


def param_groups(model: Classifier, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: one per (layer, decayed or not), each with its ``lr_scale`` =
    ``layer_decay ** (depth + 1 − layer)`` (1 for the head) and its weight decay (0 for biases, norms,
    [CLS] and position embeddings). The schedules set ``lr = lr_scale × lr(t)`` on every step."""
    depth = num_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decayed = not _no_weight_decay(name, param)
        group = groups.setdefault(
            (layer, decayed),
            {
                "params": [],
                "names": [],
                "layer": layer,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "weight_decay": weight_decay if decayed else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def supports_timm_export(arch: str) -> bool:
    """Whether timm builds this architecture (ViTs and torchvision ResNets; not the small-image stems)."""
    return arch.startswith("vit_") or (is_resnet(arch) and not arch.endswith("_cifar"))
