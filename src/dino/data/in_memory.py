"""Small datasets decoded once and kept in memory: the multi-crop augmentation then reads pixels only.

For datasets of small images (CIFAR-10: 45,000 JPEGs of 32×32 px, 138 MB decoded) the cost of reading
and decoding every file again at every epoch dwarfs the augmentation and often the training step too.
:class:`DecodedImages` decodes every image of a folder once (batched nvjpeg on a GPU, as the streaming
GPU path does, with the same PIL fallback) and keeps the uint8 pixels on the augmentation device — one
[N, 3, H, W] tensor when all images have one size, else a list. :class:`InMemoryMultiCropLoader` then
batches the sampler's indices and augments the cached pixels, exactly as
:class:`~dino.data.gpu_loader.DeviceMultiCropLoader` augments freshly decoded ones: same per-batch seeds,
same output, same mid-epoch resume.

The memory needed is checked before the work: first from a sample of the files' headers (a dataset that
clearly does not fit is refused in seconds), then as the images are decoded.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dino.data.datasets import DEFAULT_MAX_PIXELS, ImageFolderDataset
from dino.data.gpu_augment import BatchMultiCrop, to_device
from dino.data.gpu_loader import DeviceMultiCropLoader, decode_batch, read_file_bytes, read_jpeg_header

__all__ = ["DecodedImages", "InMemoryMultiCropLoader", "InMemoryTooLarge", "memory_budget"]

log = logging.getLogger(__name__)

# Share of the device's free memory (or of the host's available memory) the decoded images may take: the
# rest is left to training.
MEMORY_SHARE = 0.5
_SAMPLE_FILES = 256
_GIB = 2**30


class InMemoryTooLarge(RuntimeError):
    """The decoded dataset would not fit in the memory allowed for it."""


def memory_budget(device: torch.device) -> int:
    """Bytes the decoded images may take on ``device``: :data:`MEMORY_SHARE` of what is free there. Host
    memory is shared by the node's processes (``LOCAL_WORLD_SIZE``, set by torchrun), each of which keeps
    its own copy: each gets its part of that share."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_SHARE)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(_host_available() * MEMORY_SHARE / processes)


def _host_available() -> int:
    """Bytes of host memory available to a new allocation: Linux's MemAvailable (free memory plus the page
    cache it can drop), else the free pages, else no limit."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - neither Linux nor POSIX
        return 2**62


def _jpeg_pixels(path: Path) -> int | None:
    """Width × height from a JPEG's header; None for other files, 0 if unreadable. Plain byte parsing, so
    it may run in threads (``warnings.catch_warnings``, which PIL's readers need, is not thread-safe)."""
    try:
        with open(path, "rb") as f:
            header = read_jpeg_header(f.read(65536))
    except OSError:
        return 0  # an unreadable file is reported when it is decoded
    return None if header is None else header.height * header.width


def _pil_pixels(path: Path) -> int:
    """Width × height from PIL's lazy open (main thread only); 0 if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return img.width * img.height
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is decoded
        return 0


def _too_large(needed: float, budget: int, device: torch.device, what: str) -> InMemoryTooLarge:
    return InMemoryTooLarge(
        f"data.in_memory: {what} {needed / _GIB:.2f} GiB decoded, more than the {budget / _GIB:.2f} GiB "
        f"allowed on {device} (half of its free memory); set data.in_memory=false to decode the images "
        "batch by batch instead"
    )


def _check_estimate(
    paths: Sequence[Path], sample: Sequence[Path], pool: ThreadPoolExecutor, budget: int, device: torch.device
) -> None:
    """Refuse, before decoding anything, a dataset whose sample's mean image size says it will not fit."""
    headers = list(pool.map(_jpeg_pixels, sample))
    pixels = [_pil_pixels(path) if n is None else n for path, n in zip(sample, headers, strict=True)]
    mean_pixels = float(np.mean(pixels)) if pixels else 0.0
    estimate = 3 * mean_pixels * len(paths)
    if estimate > budget:
        raise _too_large(estimate, budget, device, f"the {len(paths)} images need about")


def _decode_into_memory(
    paths: Sequence[Path],
    pool: ThreadPoolExecutor,
    device: torch.device,
    max_pixels: int | None,
    budget: int,
    chunk: int,
) -> tuple[list[Tensor], Tensor, int]:
    """The decodable images on ``device``, each path's slot among them (-1: unreadable) and their bytes,
    decoded ``chunk`` files at a time; stops as soon as they outgrow ``budget``."""
    kept: list[Tensor] = []
    slot = torch.full((len(paths),), -1, dtype=torch.long)
    used = 0
    for start in range(0, len(paths), chunk):
        names = paths[start : start + chunk]
        encoded = pool.map(read_file_bytes, names)
        readable = [(i, data) for i, data in enumerate(encoded) if data is not None]
        decoded = decode_batch(
            [data for _, data in readable],
            device,
            max_pixels,
            [str(names[i]) for i, _ in readable],
        )
        failed = {readable[i][0] for i in decoded.failed}
        positions = [i for i, _ in readable if i not in failed]
        for i, image in zip(positions, decoded.images, strict=True):
            slot[start + i] = len(kept)
            kept.append(image)
            used += image.numel()
        if used > budget:
            raise _too_large(used, budget, device, f"the first {start + len(names)} images take")
    return kept, slot, used


class DecodedImages:
    """Every image of ``dataset`` decoded once (RGB uint8, EXIF orientation applied) and kept on ``device``.

    Files no decoder reads are left out with a :class:`SkippedImageWarning` each; ``slot[i]`` is where
    image ``i`` of the dataset is kept, -1 for those. Raises :class:`InMemoryTooLarge` when the pixels
    would take more than ``budget`` bytes (default :func:`memory_budget`), before decoding them all when
    a sample of the headers already says so.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        device: torch.device | str,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        budget: int | None = None,
        chunk: int = 1024,
        threads: int = 8,
    ) -> None:
        self.device = torch.device(device)
        paths = [path for path, _ in dataset.samples]
        budget = memory_budget(self.device) if budget is None else int(budget)
        sample = random.Random(0).sample(paths, min(len(paths), _SAMPLE_FILES))
        with ThreadPoolExecutor(max(1, threads)) as pool:
            _check_estimate(paths, sample, pool, budget, self.device)
            kept, slot, used = _decode_into_memory(paths, pool, self.device, max_pixels, budget, chunk)
        self.slot = slot
        self.labels = torch.from_numpy(dataset.samples.labels.copy())
        self.skipped = len(paths) - len(kept)
        self.nbytes = used
        sizes = {tuple(image.shape) for image in kept}
        # One size (the usual case for small-image datasets): a single tensor, batches by index_select.
        # Stacking holds a second copy for a moment: only when that fits in what is free now.
        stack = len(sizes) == 1 and used <= memory_budget(self.device)
        self.images: Tensor | list[Tensor] = torch.stack(kept) if stack else kept
        log.info(
            "decoded %d images into memory on %s (%.2f GiB%s)",
            len(kept),
            self.device,
            used / _GIB,
            f", {self.skipped} unreadable left out" if self.skipped else "",
        )

    def __len__(self) -> int:
        return int(self.slot.numel())

    def batch(self, indices: Sequence[int]) -> tuple[Tensor | list[Tensor], Tensor, int]:
        """The kept images of dataset ``indices`` (a [B, 3, H, W] tensor or a list), their labels, and how
        many of the indices were left out as unreadable."""
        index = torch.as_tensor(indices, dtype=torch.long)
        slots = self.slot[index]
        kept = slots >= 0
        if not bool(kept.all()):
            index, slots = index[kept], slots[kept]
        labels = self.labels[index]
        images: Tensor | list[Tensor]
        if isinstance(self.images, Tensor):
            images = self.images.index_select(0, to_device(slots, self.device))
        else:
            images = [self.images[s] for s in slots.tolist()]
        return images, labels, len(indices) - int(slots.numel())


class IndexSampler(Protocol):
    """A sized iterable of dataset indices, or of ``(index, seed)`` pairs (a sampler, a list)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class InMemoryMultiCropLoader(DeviceMultiCropLoader):
    """:class:`~dino.data.gpu_loader.DeviceMultiCropLoader` over :class:`DecodedImages`: batches of
    ``batch_size`` indices from ``sampler`` (the last incomplete one dropped), augmented on the images'
    device. ``sampler`` yields dataset indices, or ``(index, seed)`` pairs whose seed is ignored (the
    augmentation is seeded per batch)."""

    def __init__(
        self,
        images: DecodedImages,
        sampler: IndexSampler,
        batch_size: int,
        augment: BatchMultiCrop,
        seed: int = 0,
        rank: int = 0,
        prefetch: bool | None = None,
    ) -> None:
        super().__init__(None, augment, images.device, seed=seed, rank=rank, prefetch=prefetch)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.sampler, self.batch_size = images, sampler, int(batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _decoded_batches(self) -> Generator[tuple[int, Sequence[Tensor] | Tensor, Tensor, int], None, None]:
        step, indices = self.start_step, []
        for item in self.sampler:
            indices.append(item[0] if isinstance(item, tuple) else int(item))
            if len(indices) == self.batch_size:
                images, labels, skipped = self.images.batch(indices)
                yield step, images, labels, skipped
                step, indices = step + 1, []

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, images={len(self.images)}, "
            f"augment={self.augment}, batches={len(self)})"
        )
