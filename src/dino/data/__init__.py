"""Data loading for DINO: robust image-folder datasets, multi-crop augmentation, the bundled sample."""

from dino.data.datasets import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageDecodeError,
    ImageFolderDataset,
    SkippedImageWarning,
    UsabilityReport,
    check_usable,
    collate_skipping_bad,
    load_rgb,
)
from dino.data.multicrop_spec import MultiCropSpec
from dino.data.sample import sample_dataset
from dino.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    MultiCropAugmentation,
    RandomGaussianBlur,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "EvalTransform",
    "ImageDecodeError",
    "ImageFolderDataset",
    "MultiCropAugmentation",
    "MultiCropSpec",
    "RandomGaussianBlur",
    "SkippedImageWarning",
    "UsabilityReport",
    "check_usable",
    "collate_skipping_bad",
    "load_rgb",
    "sample_dataset",
]
