"""Image files for the evaluations that size images their own way: decoding, pixels and normalisation.

The dense protocols (video segmentation, attention maps) and the retrieval ones (landmarks, copy detection)
read lists of image files through :class:`ImageFileDataset`, which decodes them as training does and
normalises their pixels with :func:`normalize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dino.data.datasets import ImageDecodeError, load_rgb
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def image_tensor(image: Image.Image) -> Tensor:
    """[3, H, W] float tensor in [0, 1] of an 8-bit RGB picture."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


def normalize(pixels: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(pixels - mean) / std`` per channel of [3, H, W] pixels."""
    return (pixels - torch.as_tensor(mean).view(3, 1, 1)) / torch.as_tensor(std).view(3, 1, 1)


class ImageFileDataset(Dataset):
    """Base of the datasets over a list of image files: ``paths``, the normalisation and the decoding.

    Subclasses size each image their own way in ``__getitem__``, from :meth:`load` (or their own decoder),
    and finish with :meth:`normalized`. ``exif_transpose`` applies each file's EXIF orientation.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        exif_transpose: bool = True,
    ) -> None:
        self.paths = list(paths)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The ``index``-th file as RGB (:func:`~dino.data.datasets.load_rgb`); ValueError if unusable."""
        try:
            return load_rgb(self.paths[index], exif_transpose=self.exif_transpose)
        except ImageDecodeError as err:
            raise ValueError(f"cannot use {self.paths[index]}: {err}") from err

    def normalized(self, image: Image.Image | Tensor) -> Tensor:
        """A picture (or its [3, H, W] pixels in [0, 1]) normalised with the dataset's mean and std."""
        pixels = image if isinstance(image, Tensor) else image_tensor(image)
        return normalize(pixels, self.mean, self.std)
