"""Tests for dino.data.transforms: the DINO multi-crop recipe, exactly, and the evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dino.data import EvalTransform, MultiCropAugmentation, RandomGaussianBlur


@pytest.fixture()
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))


def _find(pipeline: transforms.Compose, kind: type) -> list:
    found = []
    for step in pipeline.transforms:
        found.append(step)
        if isinstance(step, transforms.RandomApply):
            found.extend(step.transforms)
    return [step for step in found if isinstance(step, kind)]


def test_crop_counts_and_sizes(image: Image.Image) -> None:
    torch.manual_seed(0)
    aug = MultiCropAugmentation(local_crops_number=3, global_crop_size=32, local_crop_size=12)
    crops = aug(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 12, 12)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    assert len(MultiCropAugmentation(local_crops_number=0, global_crop_size=8)(image)) == 2


def test_normalised_range_is_sane(image: Image.Image) -> None:
    torch.manual_seed(0)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    crops = MultiCropAugmentation(
        local_crops_number=2, global_crop_size=16, local_crop_size=8, mean=mean, std=std
    )(image)
    for crop in crops:
        assert torch.isfinite(crop).all()
        assert crop.min() >= -2.0 - 1e-5 and crop.max() <= 2.0 + 1e-5  # (0 - .5)/.25 .. (1 - .5)/.25
    default = MultiCropAugmentation(local_crops_number=0, global_crop_size=16)(image)[0]
    assert -2.2 < default.min() and default.max() < 2.7  # ImageNet-normalised [0, 1]


@pytest.mark.parametrize("name", ["global1", "global2", "local"])
def test_shared_steps_follow_the_paper(name: str) -> None:
    aug = MultiCropAugmentation(global_crops_scale=(0.3, 0.9), local_crops_scale=(0.1, 0.2))
    pipeline = getattr(aug, name)
    (crop,) = _find(pipeline, transforms.RandomResizedCrop)
    assert crop.interpolation == InterpolationMode.BICUBIC
    assert crop.size == ((96, 96) if name == "local" else (224, 224))
    assert crop.scale == ((0.1, 0.2) if name == "local" else (0.3, 0.9))
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    (flip,) = _find(pipeline, transforms.RandomHorizontalFlip)
    assert flip.p == 0.5
    (jitter_apply,) = _find(pipeline, transforms.RandomApply)
    assert jitter_apply.p == 0.8
    (jitter,) = _find(pipeline, transforms.ColorJitter)
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == pytest.approx((-0.1, 0.1))
    (gray,) = _find(pipeline, transforms.RandomGrayscale)
    assert gray.p == 0.2
    assert isinstance(pipeline.transforms[-2], transforms.ToTensor)
    assert isinstance(pipeline.transforms[-1], transforms.Normalize)
    assert tuple(pipeline.transforms[-1].mean) == (0.485, 0.456, 0.406)
    assert tuple(pipeline.transforms[-1].std) == (0.229, 0.224, 0.225)


def test_the_steps_run_in_the_papers_order() -> None:
    """Crop, flip, (jitter), grayscale, blur [, solarize on the second global view], to tensor, normalise."""
    aug = MultiCropAugmentation()
    shared = [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.RandomApply,
              transforms.RandomGrayscale, RandomGaussianBlur]  # fmt: skip
    end = [transforms.ToTensor, transforms.Normalize]
    for name, middle in (("global1", []), ("global2", [transforms.RandomSolarize]), ("local", [])):
        assert [type(t) for t in getattr(aug, name).transforms] == shared + middle + end, name


def test_the_defaults_are_the_papers_multi_crop() -> None:
    """MultiCropAugmentation() itself (what library users call): 2 global 224² crops of scale (0.4, 1),
    8 local 96² crops of scale (0.05, 0.4), blur p = 1 / 0.1 / 0.5, solarize 0.2 on the second global."""
    aug = MultiCropAugmentation()
    assert aug.local_crops_number == 8
    for name, size, scale in [
        ("global1", 224, (0.4, 1.0)),
        ("global2", 224, (0.4, 1.0)),
        ("local", 96, (0.05, 0.4)),
    ]:
        (crop,) = _find(getattr(aug, name), transforms.RandomResizedCrop)
        assert crop.size == (size, size) and crop.scale == pytest.approx(scale)
    assert tuple(aug.blur_probs) == (1.0, 0.1, 0.5) and aug.solarize_prob == 0.2


def test_view_specific_blur_and_solarize() -> None:
    aug = MultiCropAugmentation()
    blur_p = {
        name: [b.p for b in _find(getattr(aug, name), RandomGaussianBlur)]
        for name in ("global1", "global2", "local")
    }
    assert blur_p == {"global1": [1.0], "global2": [0.1], "local": [0.5]}
    for name in ("global1", "global2", "local"):
        assert all(b.sigma_range == (0.1, 2.0) for b in _find(getattr(aug, name), RandomGaussianBlur))
    (solarize,) = _find(aug.global2, transforms.RandomSolarize)
    assert solarize.p == 0.2 and solarize.threshold == 128
    assert not _find(aug.global1, transforms.RandomSolarize) and not _find(
        aug.local, transforms.RandomSolarize
    )
    steps = aug.global2.transforms
    assert steps.index(solarize) == steps.index(_find(aug.global2, RandomGaussianBlur)[0]) + 1


def test_gaussian_blur_probability_and_effect(image: Image.Image) -> None:
    torch.manual_seed(0)
    assert RandomGaussianBlur(p=0.0)(image) is image
    blurred = np.asarray(RandomGaussianBlur(p=1.0, sigma_range=(2.0, 2.0))(image)).astype(float)
    assert blurred.std() < np.asarray(image).astype(float).std() * 0.6
    applied = sum(RandomGaussianBlur(p=0.5)(image) is not image for _ in range(200))
    assert 70 < applied < 130


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"local_crops_number": -1}, "local_crops_number"),
        ({"local_crops_number": 2.5}, "local_crops_number"),
        ({"global_crop_size": 0}, "global_crop_size"),
        ({"local_crop_size": 9.5}, "local_crop_size"),
        ({"global_crops_scale": (0.0, 1.0)}, "global_crops_scale"),
        ({"global_crops_scale": (0.6, 0.4)}, "global_crops_scale"),
        ({"local_crops_scale": (0.05, 1.5)}, "local_crops_scale"),
        ({"local_crops_scale": (0.05,)}, "local_crops_scale"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        MultiCropAugmentation(**kwargs)


def test_eval_transform(image: Image.Image) -> None:
    transform = EvalTransform(resize=20, crop_size=16)
    out = transform(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, transform(image))  # deterministic
    (resize,) = _find(transform.pipeline, transforms.Resize)
    assert resize.size == 20 and resize.interpolation == InterpolationMode.BICUBIC
    assert repr(transform).startswith("EvalTransform(resize=20, crop_size=16")
    assert "local_crops_number=8" in repr(MultiCropAugmentation())
    with pytest.raises(ValueError, match="crop_size"):
        EvalTransform(resize=16, crop_size=20)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(resize=-1)


def test_blur_and_solarize_probabilities_are_configurable() -> None:
    aug = MultiCropAugmentation(local_crops_number=1, blur_probs=(0.0, 0.3, 0.7), solarize_prob=0.0)
    assert [b.p for b in _find(aug.global1, RandomGaussianBlur)] == [0.0]
    assert [b.p for b in _find(aug.global2, RandomGaussianBlur)] == [0.3]
    assert [b.p for b in _find(aug.local, RandomGaussianBlur)] == [0.7]
    assert [s.p for s in _find(aug.global2, transforms.RandomSolarize)] == [0.0]
    with pytest.raises(ValueError, match="blur_probs"):
        MultiCropAugmentation(blur_probs=(1.0, 0.1))
