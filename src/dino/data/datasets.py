"""Image-folder datasets that survive real-world folders: odd pixel modes, EXIF rotation, broken files.

Self-supervised training runs for hours over folders nobody has curated, so one bad file must cost one
warning, not a crashed run. :class:`ImageFolderDataset` returns ``None`` for an unusable file,
:func:`collate_skipping_bad` drops those items and counts them, and :func:`check_usable` stops early,
with a clear :class:`DatasetError`, when most of a folder cannot be decoded at all.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageDecodeError",
    "ImageFolderDataset",
    "SkippedImageWarning",
    "UsabilityReport",
    "check_usable",
    "collate_skipping_bad",
    "load_rgb",
    "to_rgb",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""File suffixes (lower case, with the dot) treated as images; matching is case-insensitive."""

DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Default pixel limit (width × height) above which an image is skipped as a decompression bomb:
PIL's own warning threshold at import time."""

ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Colour that transparent pixels are composited onto (white, as an image viewer would show them)."""


class DatasetError(ValueError):
    """A dataset folder that cannot be used at all (missing, empty, wrong layout, mostly undecodable)."""


class ImageDecodeError(Exception):
    """One file could not be turned into an RGB image; the message is the reason, for warnings."""


class SkippedImageWarning(UserWarning):
    """Emitted once per file that a dataset skips, naming the file and the reason."""


def load_rgb(
    path: str | os.PathLike[str] | BinaryIO,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    reduction: Callable[[int, int], float] | None = None,
    *,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB PIL image, applying its EXIF orientation (unless ``exif_transpose``
    is False: the pixels as stored, which is how the original DINO evaluation scripts read their images).

    ``reduction(width, height)`` (optional) says how many times smaller the image may come out: a JPEG is
    then decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, the largest of those that keeps
    at least ``size / reduction`` pixels per side), which skips most of the decoding work for large
    photos. Other formats, and reductions under 2, decode at full size.

    Every pixel mode PIL can open is converted faithfully (see :func:`to_rgb`); transparency is
    composited onto :data:`ALPHA_BACKGROUND`. Images with more than ``max_pixels`` pixels are refused
    before their pixel data is decoded (``None`` disables this check; PIL's own hard limit of twice
    ``Image.MAX_IMAGE_PIXELS`` still applies, since raising it would mean changing PIL's global).
    Truncated and corrupt files are refused too: PIL's ``LOAD_TRUNCATED_IMAGES`` is left untouched.

    Raises:
        ImageDecodeError: with a short human-readable reason, for any file that cannot be used.
    """
    try:
        # PIL reports oversized images and odd metadata through warnings; the caller gets one clear
        # ImageDecodeError (or a clean image) instead. The filter is scoped to this block.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return _decode_opened(img, max_pixels, reduction, exif_transpose)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"possible decompression bomb ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageDecodeError("file not found (was it deleted after the folder was scanned?)") from exc
    except Image.UnidentifiedImageError as exc:
        size = _file_size(path)
        what = "file is empty (0 bytes)" if size == 0 else "not a recognised image format"
        raise ImageDecodeError(what) from exc
    except Exception as exc:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode ({type(exc).__name__}: {exc})") from exc


def _decode_opened(
    img: Image.Image,
    max_pixels: int | None,
    reduction: Callable[[int, int], float] | None,
    exif_transpose: bool,
) -> Image.Image:
    """The pixels of an opened image as :func:`load_rgb` returns them: size checked before decoding, a JPEG
    drafted at the reduced size, orientation applied, converted to RGB."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (possible decompression bomb)"
        )
    if reduction is not None and img.format == "JPEG":
        factor = reduction(width, height)
        if factor >= 2:
            img.draft(img.mode, (math.ceil(width / factor), math.ceil(height / factor)))
    img.load()
    return to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)


def _file_size(path: str | os.PathLike[str] | BinaryIO) -> int | None:
    if not isinstance(path, str | os.PathLike):  # bytes in memory (a WebDataset shard's sample)
        return len(path.getbuffer()) if isinstance(path, io.BytesIO) else None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB copy of ``img`` whatever its mode.

    High-bit-depth modes are rescaled rather than clipped: ``I;16*`` maps 0..65535 to 0..255; ``I``
    (32-bit int) does the same when its values fit 0..65535, else it is min-max scaled; ``F`` (float)
    maps 0..1 to 0..255 when its values fit that range, else it is min-max scaled. Anything with an
    alpha channel or a transparency key is composited onto :data:`ALPHA_BACKGROUND`; palette, CMYK,
    YCbCr, LAB, HSV, L and 1-bit images go through PIL's own conversion.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(mode, np.asarray(img)), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scale_to_uint8(mode: str, pixels: np.ndarray) -> np.ndarray:
    """Map a single-channel high-bit-depth array onto 0..255 (see :func:`to_rgb` for the rules)."""
    values = pixels.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan_images(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive, symlinks followed once, hidden entries ignored),
    sorted by their path relative to ``root`` so the order never depends on the file system."""
    found: list[Path] = []
    seen_dirs: dict[str, str] = {}  # real path -> the folder first read there
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder: read once
            dirnames[:] = []
            if Path(dirpath).parent == root or Path(seen_dirs[real]).parent == root:
                log.warning(
                    "%s and %s are the same folder (a symbolic link): its images are read once, as %s",
                    seen_dirs[real], dirpath, os.path.relpath(seen_dirs[real], root),
                )  # fmt: skip
            continue
        seen_dirs[real] = dirpath
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = Path(dirpath, name)
                if os.path.exists(path):  # not a dangling symbolic link
                    found.append(path)
                else:
                    log.warning("skipping %s: a symbolic link to a file that does not exist", path)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


class SampleList(Sequence[tuple[Path, int]]):
    """The (path, label) pairs of a dataset, held as two numpy arrays — paths relative to ``root`` as
    fixed-width UTF-8 bytes, labels as int64 — instead of a list of Python objects.

    Loader workers are forked processes: every Python object they touch (a reference count changes)
    gets its memory page copied, so a list of ImageNet's 1.28 million (Path, int) tuples (≈ 0.5 GB)
    would slowly be duplicated in every worker; two arrays are two objects, and take a tenth of it.
    Reads give ``(root / relative path, label)``, as the list did.
    """

    def __init__(self, root: Path, paths: Sequence[Path], labels: Sequence[int]) -> None:
        if len(paths) != len(labels):
            raise ValueError("paths and labels have different lengths")
        self.root = Path(root)
        # surrogateescape: a file name that is not valid UTF-8 comes back byte for byte
        relative = [p.relative_to(self.root).as_posix().encode("utf-8", "surrogateescape") for p in paths]
        width = max((len(r) for r in relative), default=1)
        self._paths = np.array(relative, dtype=f"S{width}")
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return self.root / self._paths[index].decode("utf-8", "surrogateescape")

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.path(index), int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples under {str(self.root)!r})"


class ImageFolderDataset(Dataset):
    """Images under a folder, labelled by class sub-folder (ImageFolder layout) or unlabelled.

    Items are ``(image, label)`` where ``image`` is ``transform(rgb_pil_image)`` (or the PIL image when
    ``transform`` is None) and ``label`` is the class index, or ``-1`` for an unlabelled dataset. An
    item is ``None`` when its file cannot be decoded; a :class:`SkippedImageWarning` names the file
    and the reason. Use :func:`collate_skipping_bad` as the DataLoader's ``collate_fn``.

    Layout detection (``labelled=None``): the folder is labelled when no image lies directly in
    ``root`` and at least one first-level sub-folder holds images; the label is the index of that
    first-level folder in ``classes`` (images may be nested deeper inside it). Any other layout (flat,
    or images both in ``root`` and in sub-folders) is unlabelled. Hidden files and folders (names
    starting with ``.``) are ignored.

    Attributes:
        root: the dataset folder.
        samples: ``(path, label)`` pairs in deterministic sorted order.
        classes: sorted names of the first-level folders that hold images; empty when unlabelled.
        labelled: whether labels are class indices (True) or all ``-1`` (False).
        min_valid_fraction: the smallest fraction of decodable files :func:`check_usable` accepts.
        max_pixels: images larger than this are skipped as decompression bombs (None: PIL's limit only).
        decode_reduction: ``(width, height) -> factor`` by which JPEGs may be decoded smaller (see
            :func:`load_rgb`), e.g. :meth:`~dino.data.transforms.MultiCropAugmentation.decode_reduction`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        labelled: bool | None = None,
        min_valid_fraction: float = 0.5,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_reduction: Callable[[int, int], float] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset folder {self.root} does not exist; check the path")
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset path {self.root} is a file, not a folder; pass the folder holding the images"
            )
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be between 0 and 1, got {min_valid_fraction}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
        self.transform = transform
        self.min_valid_fraction = float(min_valid_fraction)
        self.max_pixels = max_pixels
        self.decode_reduction = decode_reduction

        paths = _scan_images(self.root)
        if not paths:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"no image files ({extensions}) found under {self.root}; check the path")

        top_levels = [p.relative_to(self.root).parts for p in paths]
        in_root = [p for p, parts in zip(paths, top_levels, strict=True) if len(parts) == 1]
        is_class_layout = not in_root
        if labelled is None:
            labelled = is_class_layout
        elif labelled and not is_class_layout:
            raise DatasetError(
                f"labelled=True but {len(in_root)} image(s) lie directly in {self.root} (e.g. {in_root[0].name}); "
                "this use needs labels: move every image into a class sub-folder (<folder>/<class>/<image>); "
                "(from Python, labelled=False reads the folder without labels)"
            )
        self.labelled: bool = bool(labelled)

        if self.labelled:
            self.classes: list[str] = sorted({parts[0] for parts in top_levels})
            index = {name: i for i, name in enumerate(self.classes)}
            labels = [index[parts[0]] for parts in top_levels]
        else:
            self.classes = []
            labels = [-1] * len(paths)
        self.samples = SampleList(self.root, paths, labels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        try:
            img = load_rgb(path, self.max_pixels, self.decode_reduction)
        except ImageDecodeError as exc:
            warnings.warn(f"skipping {path}: {exc}", SkippedImageWarning, stacklevel=2)
            return None
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        kind = f"labelled, {len(self.classes)} classes" if self.labelled else "unlabelled"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} images, {kind})"


def collate_skipping_bad(
    batch: Sequence[tuple[Any, int] | None],
) -> tuple[list[Tensor] | Tensor, Tensor, int]:
    """Collate dataset items, dropping the ``None`` ones that stand for undecodable files.

    Returns ``(images, labels, num_skipped)``. ``images`` is one stacked tensor when each item's
    image is a tensor, or a list with one stacked tensor per crop when each item is a list of crops
    (multi-crop). When every item was bad, ``images`` is an empty list and ``labels`` is empty: test
    ``labels.numel() == 0`` and skip the batch.
    """
    kept = [item for item in batch if item is not None]
    num_skipped = len(batch) - len(kept)
    if not kept:
        return [], torch.empty(0, dtype=torch.long), num_skipped
    images = [item[0] for item in kept]
    labels = torch.tensor([int(item[1]) for item in kept], dtype=torch.long)
    first = images[0]
    if isinstance(first, Tensor):
        return torch.stack(images), labels, num_skipped
    if isinstance(first, list | tuple) and all(isinstance(crop, Tensor) for crop in first):
        num_crops = len(first)
        if any(len(crops) != num_crops for crops in images):
            raise ValueError("items in the batch have different numbers of crops; they cannot be stacked")
        return [torch.stack([crops[i] for crops in images]) for i in range(num_crops)], labels, num_skipped
    raise TypeError(
        f"cannot collate images of type {type(first).__name__}; give the dataset a transform that returns "
        "a tensor or a list of tensors"
    )


class UsabilityReport(NamedTuple):
    """Outcome of :func:`check_usable`: how many files were decoded and which ones failed, and why."""

    checked: int
    failures: list[tuple[Path, str]]


def check_usable(
    dataset: ImageFolderDataset,
    sample_size: int = 64,
    seed: int = 0,
    min_valid_fraction: float | None = None,
) -> UsabilityReport:
    """Decode up to ``sample_size`` randomly chosen files and fail fast if too many are broken.

    Run this before training so that a folder where most files cannot be decoded stops with a clear
    error instead of silently training on almost nothing. The threshold is the dataset's
    ``min_valid_fraction`` unless given here.

    Raises:
        DatasetError: when more than ``1 - min_valid_fraction`` of the sampled files fail to decode.
    """
    if sample_size <= 0:
        raise ValueError(f"sample_size must be positive, got {sample_size}")
    fraction = dataset.min_valid_fraction if min_valid_fraction is None else min_valid_fraction
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"min_valid_fraction must be between 0 and 1, got {fraction}")
    count = min(sample_size, len(dataset.samples))
    indices = sorted(random.Random(seed).sample(range(len(dataset.samples)), count))
    failures: list[tuple[Path, str]] = []
    for i in indices:
        path = dataset.samples[i][0]
        try:
            load_rgb(path, dataset.max_pixels)
        except ImageDecodeError as exc:
            failures.append((path, str(exc)))
    if count and (count - len(failures)) / count < fraction:  # not 1 - fraction: 1 - 0.9 < 0.1 in floats
        example, reason = failures[0]
        raise DatasetError(
            f"too many files in {dataset.root} cannot be decoded: {len(failures)} of {count} sampled failed, "
            f"more than the {1.0 - fraction:.0%} that min_valid_fraction={fraction:g} allows "
            f"(e.g. {example}: {reason}); check the folder, or lower data.min_valid_fraction to train "
            "on the files that can be read"
        )
    return UsabilityReport(checked=count, failures=failures)
