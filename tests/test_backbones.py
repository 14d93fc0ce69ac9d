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
