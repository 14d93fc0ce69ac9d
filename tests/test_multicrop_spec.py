"""MultiCropSpec: one checked set of multi-crop settings for the PIL pipeline and the batched one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dino.data import IMAGENET_MEAN, MultiCropAugmentation, MultiCropSpec
from dino.data.gpu_augment import BatchMultiCrop


def test_defaults_are_the_papers_and_fields_are_stored_normalised() -> None:
    spec = MultiCropSpec()
    assert (spec.global_crops_scale, spec.local_crops_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (spec.local_crops_number, spec.global_crop_size, spec.local_crop_size) == (8, 224, 96)
    assert spec.mean == IMAGENET_MEAN and spec.blur_probs == (1.0, 0.1, 0.5) and spec.solarize_prob == 0.2
    odd = MultiCropSpec(global_crops_scale=[0.5, 1], mean=[0, 0, 1], blur_probs=[1, 0, 0], solarize_prob=1)
    assert odd.global_crops_scale == (0.5, 1.0) and odd.mean == (0.0, 0.0, 1.0)
    assert odd.blur_probs == (1.0, 0.0, 0.0) and isinstance(odd.solarize_prob, float)
    assert hash(odd) == hash(dataclasses.replace(odd))  # frozen, hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.local_crops_number = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"global_crops_scale": (0.6, 0.4)}, "global_crops_scale must satisfy 0 < low <= high <= 1"),
        ({"local_crops_scale": (0.05,)}, r"local_crops_scale must be a pair \(low, high\)"),
        ({"local_crops_number": True}, "local_crops_number must be an integer >= 0"),
        ({"global_crop_size": 0}, "global_crop_size must be a positive integer number of pixels"),
        ({"std": (0.2, 0.0, 0.2)}, r"std must be three positive numbers \(one per RGB channel\)"),
        ({"mean": (0.5, 0.5)}, "mean must be three numbers"),
        ({"blur_probs": (1.0, 0.1)}, r"blur_probs must be 3 probabilities in \[0, 1\]"),
        ({"solarize_prob": 1.5}, r"solarize_prob must be 1 probabilities in \[0, 1\], got \[1.5\]"),
    ],
)
def test_both_pipelines_refuse_what_the_spec_refuses(fields: dict, message: str) -> None:
    for make in (MultiCropSpec, MultiCropAugmentation, BatchMultiCrop):
        with pytest.raises(ValueError, match=message):
            make(**fields)


def test_a_spec_and_keyword_fields_configure_the_pipelines_alike() -> None:
    spec = MultiCropSpec(local_crops_number=2, global_crop_size=16, local_crop_size=8, solarize_prob=0.0)
    by_spec, by_fields = MultiCropAugmentation(spec), MultiCropAugmentation(**dataclasses.asdict(spec))
    assert by_spec.spec is spec and by_fields.spec == spec and repr(by_spec) == repr(by_fields)
    assert by_spec.local_crops_number == 2 and by_spec.solarize_prob == 0.0
    assert MultiCropAugmentation(spec, local_crops_number=0).spec == dataclasses.replace(
        spec, local_crops_number=0
    )

    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8)
    views = [BatchMultiCrop(spec), BatchMultiCrop(**dataclasses.asdict(spec))]
    assert views[0].spec is spec and views[0].views == views[1].views
    first, second = (aug(images, torch.Generator().manual_seed(0)) for aug in views)
    assert [tuple(v.shape) for v in first] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="MultiCropSpec"):
        BatchMultiCrop((0.4, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels_per_chunk"):
        BatchMultiCrop(spec, max_pixels_per_chunk=0)
