"""The settings of DINO's multi-crop recipe, shared by the PIL pipeline and the batched tensor one.

:class:`MultiCropSpec` holds what can be configured (crop scales, number of local views, sizes,
normalisation, blur and solarize probabilities), checked once when it is made;
:class:`~dino.data.transforms.MultiCropAugmentation` and :class:`~dino.data.gpu_augment.BatchMultiCrop`
both take one. The ``check_*`` helpers are the checks it runs, also used where single values are given
(e.g. :class:`~dino.data.transforms.EvalTransform`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropSpec",
    "check_channels",
    "check_probabilities",
    "check_scale",
    "check_size",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def check_size(name: str, value: object) -> int:
    """``value`` if it is a positive integer (a number of pixels), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return value


def check_probabilities(name: str, values: Sequence[float], n: int) -> tuple[float, ...]:
    """``values`` as a tuple of ``n`` floats in [0, 1], else a ValueError naming ``name``."""
    values = tuple(float(v) for v in values)
    if len(values) != n or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name} must be {n} probabilities in [0, 1], got {list(values)}")
    return values


def check_scale(name: str, value: Sequence[float]) -> tuple[float, float]:
    """``value`` as a pair of floats with 0 < low <= high <= 1, else a ValueError naming ``name``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {value!r}")
    return lo, hi


def check_channels(name: str, value: Sequence[float], positive: bool) -> tuple[float, float, float]:
    """``value`` as three floats (one per RGB channel, all > 0 if ``positive``), else a ValueError."""
    values = tuple(float(v) for v in value)
    if len(values) != 3 or (positive and min(values) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise ValueError(f"{name} must be {need} (one per RGB channel), got {value!r}")
    return values


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class MultiCropSpec:
    """DINO's multi-crop views: two global views of ``global_crop_size`` pixels cropped with an area in
    ``global_crops_scale``, ``local_crops_number`` local views of ``local_crop_size`` pixels with an area in
    ``local_crops_scale``, normalised with ``mean``/``std``; ``blur_probs`` are the blur probabilities of
    global view 1, global view 2 and the local views, ``solarize_prob`` that of global view 2.

    The defaults are the paper's. Every field is checked when the spec is made (a ValueError naming the
    field) and stored normalised: scales, ``mean``, ``std`` and ``blur_probs`` as tuples of floats.
    """

    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    global_crop_size: int = 224
    local_crop_size: int = 96
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_prob: float = 0.2

    def __post_init__(self) -> None:
        checked = {
            "global_crops_scale": check_scale("global_crops_scale", self.global_crops_scale),
            "local_crops_scale": check_scale("local_crops_scale", self.local_crops_scale),
            "local_crops_number": _check_count("local_crops_number", self.local_crops_number),
            "global_crop_size": check_size("global_crop_size", self.global_crop_size),
            "local_crop_size": check_size("local_crop_size", self.local_crop_size),
            "mean": check_channels("mean", self.mean, positive=False),
            "std": check_channels("std", self.std, positive=True),
            "blur_probs": check_probabilities("blur_probs", self.blur_probs, 3),
            "solarize_prob": check_probabilities("solarize_prob", [self.solarize_prob], 1)[0],
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(cls, spec: MultiCropSpec | None = None, **fields: Any) -> MultiCropSpec:
        """``spec`` with the given ``fields`` replaced (without a spec: the defaults with them), what the
        pipelines' constructors accept: a spec, keyword arguments, or both."""
        if spec is None:
            return cls(**fields)
        if not isinstance(spec, cls):
            raise TypeError(f"spec must be a {cls.__name__}, got {type(spec).__name__}")
        return replace(spec, **fields) if fields else spec
