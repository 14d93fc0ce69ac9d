"""State dicts: normalising their keys, telling their architecture, checking ViT position embeddings.

Keys are normalised (``module.`` / ``backbone.`` prefixes, the ``teacher``/``student`` entry of a full
checkpoint, a classifier ``head``/``fc``) to the released backbone layout; the architecture (ViT size,
patch and image size, depth, or ResNet variant) is read from the tensor shapes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dino.hub.errors import WeightsError, Which, short_list
from dino.models.backbones import (
    BASIC_BLOCK_LAYERS,
    SMALL_STEM_SUFFIX,
    convnet_image_size,
    is_resnet,
    narrow_resnet_name,
)

# --- Normalising state dicts ------------------------------------------------------------------------------

_CLASSIFIER_KEYS = ("head.weight", "head.bias", "fc.weight", "fc.bias")
# torch.nn.utils.parametrizations.weight_norm names → the old-style names our head (and the release) use.
_NEW_WEIGHT_NORM = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def backbone_state_dict(obj: Any, which: Which = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors (released key layout) from any supported file content.

    Handles backbone-only state dicts (ours, the released ones, timm's: a plain classifier ``head``/``fc``
    is dropped), full training checkpoints (``which`` picks the teacher or the student; ``module.`` and
    ``backbone.`` prefixes are removed) and ``{"model": …}`` / ``{"state_dict": …}`` wrappers.
    """
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        raise WeightsError(f"this checkpoint has no {which!r} entry; pick the other with which=…")
    elif isinstance(obj, dict) and not _is_tensor_dict(obj):
        wrapped = [k for k in ("model", "state_dict") if _is_tensor_dict(obj.get(k))]
        if wrapped:
            obj = obj[wrapped[0]]
    if not _is_tensor_dict(obj):
        raise WeightsError(
            "the file holds no state dict of tensors (neither a backbone nor a training checkpoint)"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    # A linear classifier (timm's ``head``, torchvision's ``fc``) is not part of the backbone.
    return {k: v for k, v in state.items() if k not in _CLASSIFIER_KEYS}


def released_model_state(obj: Any, name: str, origin: str) -> dict[str, torch.Tensor]:
    """A released full checkpoint's ``student``/``teacher`` as our ``backbone.*``/``head.*`` state dict."""
    if not _is_tensor_dict(obj):
        raise WeightsError(f"{origin}: the {name!r} entry is not a state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        for new, old in _NEW_WEIGHT_NORM.items():
            key = key.replace(new, old)
        state[key] = value
    strays = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
    if strays or not any(k.startswith("head.") for k in state):
        raise WeightsError(
            f"{origin}: the {name!r} entry is not a DINO backbone + head (stray keys {short_list(strays)}); "
            "is it a full DINO training checkpoint?"
        )
    return state


# --- Architecture ---------------------------------------------------------------------------------------


_HEADS_BY_DIM = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1536: "giant"}
_RESNET_BLOCKS: dict[tuple[int, ...], str] = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int, int]:
    """(arch, patch_size, img_size, depth) read from backbone tensor shapes."""
    if "patch_embed.proj.weight" in state and "cls_token" in state:
        dim = int(state["cls_token"].shape[-1])
        if dim not in _HEADS_BY_DIM:
            raise WeightsError(
                f"ViT width {dim} is not one of {sorted(_HEADS_BY_DIM)} (tiny/small/base/large/giant)"
            )
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = pos_embed_grid(state) or 224 // patch
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"vit_{_HEADS_BY_DIM[dim]}", patch, grid * patch, depth
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        blocks = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
        )
        bottleneck = "layer1.0.conv3.weight" in state
        width = int(state["conv1.weight"].shape[0])
        small_stem = state["conv1.weight"].shape[-1] == 3
        basic = next((d for d, layout in BASIC_BLOCK_LAYERS.items() if layout == blocks), None)
        if small_stem and not bottleneck and basic is not None and (width != 64 or basic == 10):
            return narrow_resnet_name(basic, width), 0, 32, 0  # resnet10_cifar, resnet18_w32_cifar …
        name = _RESNET_BLOCKS.get((*blocks, bottleneck))
        if bottleneck and blocks == (3, 4, 6, 3) and state["layer1.0.conv1.weight"].shape[0] == 128:
            name = "wide_resnet50_2"
        if name is None:
            raise WeightsError(f"unrecognised ResNet layout {blocks} (bottleneck={bottleneck})")
        if small_stem:  # the small-image stem (3×3 first convolution)
            name += SMALL_STEM_SUFFIX
        return name, 0, convnet_image_size(name), 0
    raise WeightsError(
        "cannot tell the architecture from these weights (neither a ViT nor a torchvision ResNet)"
    )


def pos_embed_grid(state: dict[str, torch.Tensor]) -> int | None:
    """The side S of the square patch grid the ViT position embeddings of ``state`` are stored for (None
    without ``pos_embed``), or a WeightsError for a layout that cannot be loaded or resampled."""
    problem = pos_embed_problem(state)
    if problem:
        raise WeightsError(problem)
    return math.isqrt(int(state["pos_embed"].shape[1]) - 1) if "pos_embed" in state else None


def pos_embed_problem(state: dict[str, torch.Tensor]) -> str | None:
    """Why the position embeddings of ``state`` are unusable, or None. The DINO ViT (like the original)
    stores one class-token position then an S×S patch grid: [1, 1 + S*S, D]."""
    pos = state.get("pos_embed")
    if pos is None:
        return None
    if pos.ndim != 3 or pos.shape[0] != 1:
        return f"pos_embed has shape {tuple(pos.shape)}, not [1, 1 + S*S, dim]; is it a ViT state dict?"
    n = int(pos.shape[1])
    if n >= 2 and math.isqrt(n - 1) ** 2 == n - 1:
        return None
    side = math.isqrt(n)
    if side * side == n:
        layout = (
            f"{n} = {side}×{side} positions: a patch grid with no class-token position (timm's "
            "no_embed_class=True), or a class token plus a non-square grid"
        )
    else:
        layout = f"{n} positions: a class token plus {n - 1} patches, which is not a square S×S grid"
    return (
        f"the ViT position embeddings hold {layout}. Position embeddings with no class-token position or "
        "for a non-square patch grid are not supported (img_size cannot resample them either): only "
        "ViTs with a class-token position and a square grid, as DINO's, load"
    )


def describe_architecture(arch: str, patch_size: int, img_size: int, depth: int) -> str:
    """``vit_small/16 (224 px, 12 blocks)`` or ``resnet50``."""
    return f"{arch}/{patch_size} ({img_size} px, {depth} blocks)" if arch.startswith("vit_") else arch


def infer_architecture_or_none(state: dict[str, torch.Tensor]) -> tuple[str, int, int, int] | None:
    """:func:`infer_architecture`, or None for weights it cannot tell (where a caller has other clues)."""
    try:
        return infer_architecture(state)
    except WeightsError:
        return None


def check_img_size_applies(arch: str, img_size: int) -> None:
    """Refuse an ``img_size`` request for a backbone it means nothing to: it resamples the position
    embeddings of the DINO ViTs (``vit_*``); convolutional networks have none and take any input size."""
    if arch.startswith("vit_"):
        return
    what = (
        "a convolutional network that has none and takes any input size"
        if is_resnet(arch.removeprefix("torchvision:"))
        else "not one of them"
    )
    raise WeightsError(
        f"img_size {img_size} applies only to ViT position embeddings (the vit_* architectures); {arch} is "
        f"{what}: drop img_size (--img-size)"
    )
