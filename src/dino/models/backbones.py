"""Backbone registry: ``vit_{tiny,small,base,large}``, torchvision ResNets, and optionally timm models."""

from __future__ import annotations

from torch import nn

from dino.models.vision_transformer import VIT_SIZES, vit

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")


def available_archs() -> list[str]:
    return [f"vit_{size}" for size in VIT_SIZES] + list(RESNETS) + ["timm:<model name>"]


def build_backbone(
    arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0, depth: int = 0
) -> tuple[nn.Module, int]:
    """Build an untrained backbone with its classifier removed; returns it and its feature dimension.

    ``depth`` (ViT only) overrides the number of blocks; 0 keeps the size's standard depth."""
    if arch.startswith("vit_"):
        model = vit(arch.removeprefix("vit_"), patch_size, img_size, drop_path_rate, depth)
        return model, model.embed_dim
    if arch in RESNETS:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("arch 'timm:…' needs timm: pip install 'dino[timm]'") from err
        model = timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=0)
        return model, model.num_features
    raise ValueError(f"unknown arch {arch!r}; choose one of {available_archs()}")


def is_vit(arch: str) -> bool:
    return arch.startswith("vit_")
