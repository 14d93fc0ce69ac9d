"""DINO's multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and App. D) and the evaluation transform.

Each training image yields two large "global" views and several small "local" views; the student
sees all of them, the teacher only the global ones, which is what teaches local-to-global
correspondence. The recipe follows the paper's (and its BYOL-derived) augmentations exactly,
including PIL's Gaussian blur with radius = sigma.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms
from torchvision.transforms import InterpolationMode

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "MultiCropAugmentation", "RandomGaussianBlur"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class RandomGaussianBlur:
    """With probability ``p``, blur a PIL image with PIL's Gaussian filter, sigma ~ U(sigma_range).

    PIL's ``GaussianBlur(radius)`` takes the standard deviation as ``radius``, which is how the
    reference DINO code blurs; unlike torchvision's ``GaussianBlur`` no kernel size has to be chosen.
    Randomness comes from torch's generator so that DataLoader worker seeding covers it.
    """

    def __init__(self, p: float = 0.5, sigma_range: tuple[float, float] = (0.1, 2.0)) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        lo, hi = sigma_range
        if not 0.0 < lo <= hi:
            raise ValueError(f"sigma_range must satisfy 0 < low <= high, got {sigma_range}")
        self.p = float(p)
        self.sigma_range = (float(lo), float(hi))

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return img
        lo, hi = self.sigma_range
        sigma = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma_range={self.sigma_range})"


def check_size(name: str, value: object) -> int:
    """``value`` as a positive whole number of pixels, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return value


def check_probabilities(name: str, values: Sequence[float], n: int) -> tuple[float, ...]:
    """``values`` as ``n`` probabilities in [0, 1], or a ValueError naming ``name``."""
    values = tuple(float(v) for v in values)
    if len(values) != n or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} must be {n} probabilities in [0, 1], got {list(values)}")
    return values


def check_scale(name: str, value: Sequence[float]) -> tuple[float, float]:
    """``value`` as a crop-area range (low, high) with 0 < low <= high <= 1, or a ValueError naming ``name``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {value!r}")
    return lo, hi


def check_channels(name: str, value: Sequence[float], positive: bool) -> tuple[float, float, float]:
    """``value`` as one number per RGB channel (positive ones with ``positive``), or a ValueError naming
    ``name``."""
    values = tuple(float(v) for v in value)
    if len(values) != 3 or (positive and min(values) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ValueError(f"{name} must be {need} (one per RGB channel), got {value!r}")
    return values  # type: ignore[return-value]


class MultiCropAugmentation:
    """Turn one PIL image into DINO's views: ``[global_1, global_2, local_1, ..., local_n]``.

    Every view is a random-resized crop (aspect ratio 3/4..4/3, bicubic), horizontal flip (p 0.5),
    colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8, grayscale
    (p 0.2), then a view-specific tail: global view 1 is always blurred; global view 2 is blurred
    with p 0.1 and solarized (threshold 128) with p 0.2; local views are blurred with p 0.5. Blur
    sigma ~ U(0.1, 2.0). Views are float CHW tensors normalised with ``mean``/``std``.

    The three pipelines are kept as ``global1``, ``global2`` and ``local`` (torchvision ``Compose``).
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        local_crops_number: int = 8,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_probs: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_prob: float = 0.2,
    ) -> None:
        self.blur_probs = check_probabilities("blur_probs", blur_probs, 3)
        self.solarize_prob = check_probabilities("solarize_prob", [solarize_prob], 1)[0]
        self.global_crops_scale = check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = check_scale("local_crops_scale", local_crops_scale)
        if (
            isinstance(local_crops_number, bool)
            or not isinstance(local_crops_number, int)
            or local_crops_number < 0
        ):
            raise ValueError(f"local_crops_number must be an integer >= 0, got {local_crops_number!r}")
        self.local_crops_number = local_crops_number
        self.global_crop_size = check_size("global_crop_size", global_crop_size)
        self.local_crop_size = check_size("local_crop_size", local_crop_size)
        self.mean = check_channels("mean", mean, positive=False)
        self.std = check_channels("std", std, positive=True)

        def pipeline(
            size: int, scale: tuple[float, float], tail: list[Callable[[Image.Image], Image.Image]]
        ) -> transforms.Compose:
            return transforms.Compose(
                [
                    transforms.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                    transforms.RandomHorizontalFlip(p=0.5),
                    transforms.RandomApply(
                        [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                    ),
                    transforms.RandomGrayscale(p=0.2),
                    *tail,
                    transforms.ToTensor(),
                    transforms.Normalize(self.mean, self.std),
                ]
            )

        blur1, blur2, blur_local = self.blur_probs
        self.global1 = pipeline(self.global_crop_size, self.global_crops_scale, [RandomGaussianBlur(p=blur1)])
        self.global2 = pipeline(
            self.global_crop_size,
            self.global_crops_scale,
            [RandomGaussianBlur(p=blur2), transforms.RandomSolarize(threshold=128, p=self.solarize_prob)],
        )
        self.local = pipeline(
            self.local_crop_size, self.local_crops_scale, [RandomGaussianBlur(p=blur_local)]
        )

    def decode_reduction(self, width: int, height: int) -> float:
        """How many times smaller a ``width`` × ``height`` image may be decoded (JPEG DCT scaling, see
        :func:`~dino.data.datasets.load_rgb`) with every view still cropped from at least as many pixels
        as it outputs: then each crop is still shrunk, never enlarged, by its resize.

        The smallest crop side random-resized-crop can draw is that of the smallest area at aspect ratio
        3/4 (or the image's shorter side when no such crop fits); one pixel is kept for rounding."""
        views = [(self.global_crops_scale[0], self.global_crop_size)]
        if self.local_crops_number:
            views.append((self.local_crops_scale[0], self.local_crop_size))
        factors = [
            (min(math.sqrt(scale * width * height * 3 / 4), width, height) - 1) / size
            for scale, size in views
        ]
        return max(1.0, min(factors))

    def __call__(self, img: Image.Image) -> list[Tensor]:
        crops = [self.global1(img), self.global2(img)]
        crops.extend(self.local(img) for _ in range(self.local_crops_number))
        return crops

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, local_crops_number={self.local_crops_number}, "
            f"global_crop_size={self.global_crop_size}, local_crop_size={self.local_crop_size}, "
            f"mean={self.mean}, std={self.std})"
        )


class EvalTransform:
    """Deterministic view for feature extraction and evaluation: bicubic resize of the shorter side to
    ``resize``, centre crop to ``crop_size``, then a normalised float CHW tensor (the paper's k-NN and
    linear-probe protocol uses 256 / 224)."""

    def __init__(
        self,
        resize: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.resize = check_size("resize", resize)
        self.crop_size = check_size("crop_size", crop_size)
        if self.crop_size > self.resize:
            raise ValueError(
                f"crop_size ({crop_size}) must not exceed resize ({resize}), or the crop would be padded"
            )
        self.mean = check_channels("mean", mean, positive=False)
        self.std = check_channels("std", std, positive=True)
        self.pipeline = transforms.Compose(
            [
                transforms.Resize(self.resize, interpolation=InterpolationMode.BICUBIC),
                transforms.CenterCrop(self.crop_size),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, img: Image.Image) -> Tensor:
        return self.pipeline(img)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resize={self.resize}, crop_size={self.crop_size}, "
            f"mean={self.mean}, std={self.std})"
        )
