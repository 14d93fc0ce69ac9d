"""Backbone registry: ``vit_{tiny,small,base,large,giant}``, torchvision ResNets (also with a small-image stem),
and optionally timm models."""

from __future__ import annotations

import re

from torch import nn
from torchvision.models.resnet import BasicBlock

from dino.models.vision_transformer import VIT_SIZES, vit

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
# ``resnet18_cifar`` …: the same network with the stem of small-image (32 px) work — a 3×3 stride-1 first
# convolution and no max-pool, so a 32 px input keeps a 32×32 map into layer1 instead of 8×8.
SMALL_STEM_SUFFIX = "_cifar"
SMALL_STEM_RESNETS = tuple(name + SMALL_STEM_SUFFIX for name in RESNETS)
# Narrower and shallower small-image ResNets for CPU budgets, in torchvision's layout (same state-dict
# keys): ``resnet10_cifar`` (one basic block per stage), ``resnet{10,18,34}_w{W}_cifar`` with W channels
# in the first stage (torchvision's 64 halved: a quarter of the FLOPs).
BASIC_BLOCK_LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_NARROW = re.compile(r"^resnet(10|18|34)(?:_w([1-9][0-9]*))?_cifar$")


def available_archs() -> list[str]:
    return (
        [f"vit_{size}" for size in VIT_SIZES]
        + list(RESNETS)
        + list(SMALL_STEM_RESNETS)
        + ["resnet10_cifar", "resnet{10,18,34}_w<width>_cifar", "timm:<model name>"]
    )


def is_resnet(arch: str) -> bool:
    return arch in RESNETS or arch in SMALL_STEM_RESNETS or narrow_resnet_layout(arch) is not None


def narrow_resnet_layout(arch: str) -> tuple[tuple[int, ...], int] | None:
    """(blocks per stage, first-stage width) of the small-image ResNets torchvision has no builder for:
    ``resnet10_cifar`` and any ``resnet{10,18,34}_w{W}_cifar``; None for every other name."""
    match = _NARROW.match(arch)
    if match is None or (match.group(2) is None and match.group(1) != "10"):
        return None  # resnet18_cifar / resnet34_cifar: torchvision's own, with the small stem
    return BASIC_BLOCK_LAYERS[int(match.group(1))], int(match.group(2) or 64)


def narrow_resnet_name(depth: int, width: int) -> str:
    return f"resnet{depth}_cifar" if width == 64 else f"resnet{depth}_w{width}_cifar"


class SmallImageResNet(nn.Module):
    """A basic-block ResNet for 32 px images with any first-stage width: a 3×3 stride-1 stem, no max-pool,
    stages of ``width``, 2×, 4×, 8× channels. Module names are torchvision's (``conv1``, ``layer1.0.conv1``
    …), so its weights read like a torchvision ResNet's; the classifier is removed (``fc`` is identity)."""

    def __init__(self, layers: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        channels = width
        for i, blocks in enumerate(layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            downsample = None
            if stride != 1 or channels != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(channels, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            stage = [BasicBlock(channels, planes, stride, downsample)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            channels = planes
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.embed_dim = channels
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.avgpool(x).flatten(1))


def convnet_image_size(arch: str) -> int:
    """The input size a convolutional backbone is made for: 32 px with the small-image stem, else 224."""
    return 32 if arch.endswith(SMALL_STEM_SUFFIX) else 224


def build_backbone(
    arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0, depth: int = 0
) -> tuple[nn.Module, int]:
    """Build an untrained backbone with its classifier removed; returns it and its feature dimension.

    ``depth`` (ViT only) overrides the number of blocks; 0 keeps the size's standard depth."""
    if arch.startswith("vit_"):
        transformer = vit(arch.removeprefix("vit_"), patch_size, img_size, drop_path_rate, depth)
        return transformer, transformer.embed_dim
    narrow = narrow_resnet_layout(arch)
    if narrow is not None:
        small = SmallImageResNet(*narrow)
        return small, small.embed_dim
    if is_resnet(arch):
        import torchvision

        small_stem = arch.endswith(SMALL_STEM_SUFFIX)
        model = getattr(torchvision.models, arch.removesuffix(SMALL_STEM_SUFFIX))(weights=None)
        dim = model.fc.in_features
        model.fc = nn.Identity()
        if small_stem:
            width = model.conv1.out_channels
            model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
            model.maxpool = nn.Identity()
        return model, dim
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("arch 'timm:…' needs timm: pip install 'dino[timm]'") from err
        name = arch.removeprefix("timm:")
        if not timm.is_model(name):
            raise ValueError(
                f"timm has no model {name!r} (timm {timm.__version__}); list them with "
                "python -c 'import timm; print(timm.list_models())'"
            )
        return _timm_model(timm, name, img_size, drop_path_rate)
    raise ValueError(f"unknown arch {arch!r}; choose one of {available_archs()}")


def is_vit(arch: str) -> bool:
    return arch.startswith("vit_")


def _timm_model(timm, name: str, img_size: int, drop_path_rate: float) -> tuple[nn.Module, int]:
    """A timm model without classifier, with stochastic depth, and for vision transformers sized for the
    global crops and taking any input size (local crops, evaluation sizes): ``dynamic_img_size``; and its
    feature dimension."""
    base = {"pretrained": False, "num_classes": 0}
    attempts = (
        {"img_size": img_size, "dynamic_img_size": True, "drop_path_rate": drop_path_rate},
        {"drop_path_rate": drop_path_rate},  # convolutional networks take no image size
    )
    for extra in attempts:
        try:
            model = timm.create_model(name, **base, **extra)
        except TypeError:
            continue
        return model, model.num_features
    if drop_path_rate > 0:
        raise ValueError(
            f"timm model {name!r} takes no drop_path_rate; set model.drop_path_rate=0 to train it without "
            "stochastic depth"
        )
    model = timm.create_model(name, **base)
    return model, model.num_features
