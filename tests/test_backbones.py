"""The backbone registry: torchvision ResNets, timm models sized for multi-crop training."""

from __future__ import annotations

import pytest
import torch

from dino.models.backbones import build_backbone, is_resnet
from dino.models.head import DINOHead
from dino.models.multicrop import MultiCropWrapper


def test_resnets_lose_their_classifier_and_the_small_stem_keeps_32px_maps():
    model, dim = build_backbone("resnet18_cifar")
    assert dim == 512 and isinstance(model.fc, torch.nn.Identity) and is_resnet("resnet18_cifar")
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_timm_backbones_take_every_crop_size_with_the_students_stochastic_depth(name):
    pytest.importorskip("timm")
    student, dim = build_backbone(f"timm:{name}", img_size=32, drop_path_rate=0.1)
    teacher, _ = build_backbone(f"timm:{name}", img_size=32, drop_path_rate=0.0)
    rates = [m.drop_prob for m in student.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)  # rising to the configured rate over depth
    assert not [m for m in teacher.modules() if type(m).__name__ == "DropPath"]
    wrapper = MultiCropWrapper(student, DINOHead(dim, 64, 32, 16))
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3  # global and local sizes
    assert wrapper(crops).shape == (10, 64)


@pytest.mark.parametrize(
    ("arch", "blocks", "widths"),
    [
        ("resnet10_cifar", (1, 1, 1, 1), (64, 128, 256, 512)),
        ("resnet10_w32_cifar", (1, 1, 1, 1), (32, 64, 128, 256)),
        ("resnet18_w16_cifar", (2, 2, 2, 2), (16, 32, 64, 128)),
    ],
)
def test_narrow_small_image_resnets_have_torchvisions_layout(arch, blocks, widths):
    from dino.hub.state import infer_architecture

    model, dim = build_backbone(arch)
    assert is_resnet(arch) and dim == widths[-1]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    for stage, (n, width) in enumerate(zip(blocks, widths, strict=True), start=1):
        layer = getattr(model, f"layer{stage}")
        assert len(layer) == n and layer[0].conv1.out_channels == width
        assert layer[0].conv1.stride == ((1, 1) if stage == 1 else (2, 2))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, dim) and model(torch.randn(2, 3, 16, 16)).shape == (2, dim)
    assert infer_architecture(model.state_dict())[:3] == (arch, 0, 32)  # weights name their network


def test_resnet10_cifar_is_torchvisions_resnet_with_the_small_stem():
    from torchvision.models.resnet import BasicBlock, ResNet

    ours, _ = build_backbone("resnet10_cifar")
    theirs = ResNet(BasicBlock, [1, 1, 1, 1])
    theirs.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    theirs.maxpool, theirs.fc = torch.nn.Identity(), torch.nn.Identity()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))
