"""The GPU data path: workers only read file bytes, JPEGs are decoded in batches on the device.

The CPU pipeline decodes and augments every image in a worker process, which on a many-core machine still
leaves a fast GPU waiting (the original DINO loader delivers about half of what the model could consume).
Here the :class:`EncodedImageDataset` workers just read files; :func:`decode_batch` decodes a batch of
JPEGs at once (nvjpeg through ``torchvision.io.decode_jpeg`` on CUDA, libjpeg on CPU) and
:class:`DeviceMultiCropLoader` hands the decoded batch to :class:`~dino.data.gpu_augment.BatchMultiCrop`.

Files the fast decoder should not or cannot read take the CPU pipeline's own PIL path, so every file the
CPU pipeline accepts is accepted here and looks the same: non-JPEG formats (PNG transparency composited on
white, 16-bit and palette images), CMYK/YCCK and 12-bit JPEGs, and any JPEG the fast decoder rejects.
EXIF orientation is applied on both paths. Files that no decoder can read are reported, so that the
training loop counts them as skipped, exactly as with :func:`~dino.data.datasets.collate_skipping_bad`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import queue
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from dino.data.datasets import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageFolderDataset,
    SampleList,
    SkippedImageWarning,
    to_rgb,
)
from dino.data.gpu_augment import BatchMultiCrop

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; their nvjpeg batch decoding is what
# this module uses. One narrow filter, set once here, rather than ``warnings.catch_warnings`` around each
# call: that context manager saves and restores the process-wide filter list, so entered in the prefetch
# thread while the main thread enters and leaves one of its own, it can leave an "ignore everything" filter
# installed for the rest of the run (silencing, among others, the skipped-file warnings).
TORCHVISION_DECODER_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"
warnings.filterwarnings("ignore", message=TORCHVISION_DECODER_DEPRECATION, category=DeprecationWarning)

__all__ = [
    "DecodedBatch",
    "DeviceMultiCropLoader",
    "EncodedImageDataset",
    "JpegHeader",
    "PackedBytes",
    "collate_encoded",
    "decode_batch",
    "decode_with_pil",
    "read_file_bytes",
    "read_jpeg_header",
]

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic coded).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: no length field
_EXIF_ORIENTATION_TAG = 0x0112


# ------------------------------------------------------------------------------------------ dataset


class EncodedImageDataset(Dataset):
    """Image files as raw bytes: items are ``(bytes as a uint8 1-D tensor, label)``, or ``None`` when the
    file cannot be read (a :class:`SkippedImageWarning` names it).

    Same folder rules, file order, classes and labels as :class:`~dino.data.datasets.ImageFolderDataset`
    (whose scan it reuses); decoding is left to :func:`decode_batch` in the main process. Use
    :func:`collate_encoded` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self, root: str | os.PathLike[str] | ImageFolderDataset, labelled: bool | None = None
    ) -> None:
        # An already-scanned dataset is reused as is, so a large folder is listed only once.
        folder = root if isinstance(root, ImageFolderDataset) else ImageFolderDataset(root, labelled=labelled)
        self.root: Path = folder.root
        self.samples: SampleList = folder.samples
        self.classes: list[str] = folder.classes
        self.labelled: bool = folder.labelled

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str] | None:
        """``(the file's bytes, its label, its path)`` — the path names the file in the warning of a
        decode that fails later, in the main process — or None when it cannot be read."""
        path, label = self.samples[index]
        data = read_file_bytes(path)
        return None if data is None else (data, label, str(path))

    def __repr__(self) -> str:
        kind = f"labelled, {len(self.classes)} classes" if self.labelled else "unlabelled"
        return f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} files, {kind})"


def read_file_bytes(path: Path) -> Tensor | None:
    """A file's bytes as a uint8 1-D tensor, or None (with a :class:`SkippedImageWarning` naming it) when
    it cannot be read or is empty."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        warnings.warn(f"skipping {path}: cannot read the file ({exc})", SkippedImageWarning, stacklevel=3)
        return None
    if data.size == 0:
        warnings.warn(f"skipping {path}: file is empty (0 bytes)", SkippedImageWarning, stacklevel=3)
        return None
    return torch.from_numpy(data)


class PackedBytes(Sequence[Tensor]):
    """Several files' bytes in one uint8 tensor, read as a sequence of per-file uint8 1-D tensors (views).

    A batch handed from a loader worker to the main process crosses in shared memory storage by storage,
    each with a file-descriptor handshake per tensor: one packed tensor instead of one per file saves the
    receiving process most of that CPU time (measured by ``benchmarks/data_pipeline.py``, ``bytes-only``). The receiver is the GPU data path's prefetch thread, which shares the interpreter
    with the training loop.
    """

    def __init__(self, parts: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        if names is not None and len(names) != len(parts):
            raise ValueError(f"got {len(names)} names for {len(parts)} files; pass one name per file or none")
        self.data = torch.cat(list(parts)) if len(parts) else torch.empty(0, dtype=torch.uint8)
        self.offsets = [0, *itertools.accumulate(len(part) for part in parts)]  # plain ints: pickled as such
        self.names = list(names) if names is not None else None  # the files' paths, for warnings

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]  # files one by one, no slices
        if not -len(self) <= index < len(self):
            raise IndexError(f"file {index} of a batch of {len(self)}")
        index %= len(self)
        return self.data[self.offsets[index] : self.offsets[index + 1]]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def pin_memory(self) -> PackedBytes:
        """The same files in pinned memory (what a ``DataLoader(pin_memory=True)`` asks of its batches):
        one pinned tensor, not one per file."""
        pinned = PackedBytes.__new__(PackedBytes)
        pinned.data, pinned.offsets, pinned.names = self.data.pin_memory(), list(self.offsets), self.names
        return pinned

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} files, {self.data.numel()} bytes)"


def collate_encoded(
    batch: Sequence[tuple[Tensor, int] | tuple[Tensor, int, str] | None],
) -> tuple[PackedBytes, Tensor, int]:
    """Collate :class:`EncodedImageDataset` items — ``(bytes, label, path)``, or ``(bytes, label)`` —:
    ``(the files' bytes, labels, number of unreadable files dropped)``. The bytes are packed into one
    tensor (:class:`PackedBytes`, a sequence of per-file tensors, which keeps the paths when every item
    has one), so that a worker hands a batch over in one piece."""
    kept = [item for item in batch if item is not None]
    labels = torch.tensor([int(item[1]) for item in kept], dtype=torch.long)
    names = [item[2] for item in kept if len(item) == 3]
    packed = PackedBytes([item[0] for item in kept], names if kept and len(names) == len(kept) else None)
    return packed, labels, len(batch) - len(kept)


# ------------------------------------------------------------------------------------- JPEG header


class JpegHeader(NamedTuple):
    """What the fast path needs to know before decoding a JPEG: size, colour components, bit depth and
    EXIF orientation (1 = upright, 2..8 as in the EXIF standard)."""

    height: int
    width: int
    components: int
    precision: int
    orientation: int


_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"  # the APP1 segment of XMP metadata


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 of a TIFF-structured EXIF block (1 when out of range; None when the
    block has no such tag or cannot be read)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT, left-aligned
            return value if 1 <= value <= 8 else 1
    return None


def read_jpeg_header(data: bytes | memoryview) -> JpegHeader | None:
    """Parse a JPEG's markers up to its start-of-frame; ``None`` when ``data`` is not a JPEG or the
    markers are malformed. Reads only the header (a few hundred bytes to a few KB), never the pixels.

    The orientation is that of the first EXIF segment holding one, as PIL reads it. A file whose EXIF
    gives none but which carries XMP metadata also gets ``None``: PIL may take the orientation from the
    XMP, so the file goes the CPU decoder's way and is turned exactly as there."""
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    pos, orientation, xmp = 2, None, False
    while pos + 4 <= len(view):
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = int.from_bytes(view[pos + 2 : pos + 4], "big")
        segment = view[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xE1 and bytes(segment[:6]) == b"Exif\x00\x00":
            if orientation is None:
                orientation = _exif_orientation(bytes(segment[6:]))
        elif marker == 0xE1 and bytes(segment[: len(_XMP_ID)]) == _XMP_ID:
            xmp = True
        elif marker in _SOF_MARKERS:
            if len(segment) < 6 or (orientation is None and xmp):
                return None
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            return JpegHeader(height, width, segment[5], segment[0], orientation or 1)
        elif marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _orient(image: Tensor, orientation: int) -> Tensor:
    """Apply an EXIF orientation to a [C, H, W] tensor, as PIL's ``ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)  # rotate 90° clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)  # rotate 90° counter-clockwise
    return image


# ------------------------------------------------------------------------------------------- decode


def decode_with_pil(data: bytes | memoryview, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Tensor:
    """Decode image bytes with PIL exactly as the CPU pipeline does (:func:`~dino.data.datasets.load_rgb`:
    EXIF orientation, every pixel mode converted to 8-bit RGB, transparency on white), as uint8 [3, H, W].

    Raises:
        ImageDecodeError: with a short reason, for bytes that are not a usable image.
    """
    try:  # no catch_warnings here: this runs in the prefetch thread (see TORCHVISION_DECODER_DEPRECATION)
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (possible decompression bomb)"
                )
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"possible decompression bomb ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image format") from exc
    except Exception as exc:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class DecodedBatch(NamedTuple):
    """Result of :func:`decode_batch`: the decoded images, in input order with the failed ones left out,
    and the input positions that no decoder could read."""

    images: list[Tensor]
    failed: list[int]


def _fast_decodable(header: JpegHeader | None, max_pixels: int | None) -> bool:
    """8-bit gray or YCbCr JPEGs within the pixel limit take the fast decoder; everything else PIL."""
    return (
        header is not None
        and header.components in (1, 3)
        and header.precision == 8
        and header.height > 0
        and header.width > 0
        and (max_pixels is None or header.height * header.width <= max_pixels)
    )


def _decode_fast(data: Tensor, device: torch.device) -> Tensor:
    """One JPEG with torchvision's decoder on ``device`` (nvjpeg on CUDA), as RGB uint8 [3, H, W]."""
    if device.type == "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return decode_image(data, mode=ImageReadMode.RGB)


def _decode_fast_batch(encoded: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Decode JPEGs, in one batched nvjpeg call on CUDA; a file the decoder rejects gives ``None``.

    A batched call fails as a whole when one file is bad, so a failed batch is retried file by file.
    """
    if device.type == "cuda" and len(encoded) > 1:
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
    decoded: list[Tensor | None] = []
    for data in encoded:
        try:
            decoded.append(_decode_fast(data, device))
        except RuntimeError:
            decoded.append(None)
    return decoded


def decode_batch(
    encoded: Sequence[Tensor],
    device: torch.device | str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    names: Sequence[str] | None = None,
) -> DecodedBatch:
    """Decode a batch of encoded image files into RGB uint8 [3, H, W] tensors on ``device``.

    8-bit JPEGs (gray or YCbCr) go to torchvision's decoder: one batched nvjpeg call when ``device`` is
    CUDA, libjpeg on the CPU otherwise. Every other file, and any JPEG that decoder rejects, is decoded
    on the CPU with PIL exactly as the CPU pipeline decodes it (:func:`decode_with_pil`), then moved to
    ``device``. Images over ``max_pixels`` are refused as possible decompression bombs, as in
    :class:`~dino.data.datasets.ImageFolderDataset`. Each file that no decoder can read raises a
    :class:`SkippedImageWarning` (naming ``names[i]`` when given) and is listed in ``failed``.

    Args:
        encoded: file contents as uint8 1-D CPU tensors (from :class:`EncodedImageDataset`).
        device: where the decoded images should live.
        max_pixels: largest accepted width × height (None: no limit beyond PIL's own).
        names: optional file names, for the warnings.
    """
    device = torch.device(device)
    if names is not None and len(names) != len(encoded):
        raise ValueError(f"got {len(names)} names for {len(encoded)} files; pass one name per file or none")
    bad = [
        i for i, data in enumerate(encoded) if data.dtype != torch.uint8 or data.dim() != 1 or data.is_cuda
    ]
    if bad:
        raise ValueError(
            f"encoded file {bad[0]} is not a uint8 1-D CPU tensor (got {encoded[bad[0]].dtype}, shape "
            f"{tuple(encoded[bad[0]].shape)} on {encoded[bad[0]].device}); pass the raw file bytes"
        )
    buffers = [data.numpy().data for data in encoded]
    headers = [read_jpeg_header(buf) for buf in buffers]
    fast = [i for i, header in enumerate(headers) if _fast_decodable(header, max_pixels)]

    images: list[Tensor | None] = [None] * len(encoded)
    for i, image in zip(fast, _decode_fast_batch([encoded[i] for i in fast], device), strict=True):
        header = headers[i]
        if image is not None and header is not None:
            images[i] = _orient(image, header.orientation)

    failed: list[int] = []
    for i, image in enumerate(images):
        if image is not None:
            continue
        try:
            images[i] = decode_with_pil(buffers[i], max_pixels).to(device)
        except ImageDecodeError as exc:
            name = names[i] if names is not None else f"file {i} of the batch"
            warnings.warn(f"skipping {name}: {exc}", SkippedImageWarning, stacklevel=2)
            failed.append(i)
    return DecodedBatch([image for image in images if image is not None], failed)


# ------------------------------------------------------------------------------------------- loader


class DeviceMultiCropLoader:
    """Wrap a DataLoader of :class:`EncodedImageDataset` batches: decode on ``device`` and augment there.

    Yields ``(crops, labels, num_skipped)`` like the CPU pipeline's loader with
    :func:`~dino.data.datasets.collate_skipping_bad`: ``crops`` is the list of normalised view batches on
    ``device``, ``labels`` the labels of the decoded images (on the CPU, as from the CPU loader),
    ``num_skipped`` the unreadable plus undecodable files. When every file of a batch failed, ``crops``
    is empty and ``labels`` has no element. Augmentation randomness is drawn on the CPU from a generator
    reseeded for every batch from ``(seed, epoch, step, rank)``, so a run resumed mid-epoch
    (``set_epoch(epoch, start_step)``) draws the same crops as an uninterrupted one; the device only
    receives the drawn parameters (a few host-to-device copies) and is never read back.

    On a GPU each batch is prepared on a CUDA stream of its own and, with ``prefetch`` (the default
    there), in a background thread that keeps one batch ready ahead: the host work of decoding and
    augmenting batch t + 1 (Python, kernel launches) then overlaps the training step t instead of adding
    to it.
    """

    def __init__(
        self,
        loader: DataLoader | None,  # None in subclasses that supply decoded batches themselves
        augment: BatchMultiCrop,
        device: torch.device | str,
        seed: int = 0,
        rank: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        prefetch: bool | None = None,
    ) -> None:
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # a background thread needs the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.augment = augment.to(self.device)
        self.seed, self.rank, self.max_pixels = int(seed), int(rank), max_pixels
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)
        self.epoch, self.start_step = 0, 0
        self.generator = torch.Generator()  # parameters drawn on the CPU: no device read per batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration is ``epoch``, starting at its ``start_step``-th batch (for resuming)."""
        self.epoch, self.start_step = int(epoch), int(start_step)

    def __len__(self) -> int:
        assert self.loader is not None, "a subclass without a DataLoader defines __len__"
        return len(self.loader)

    def batch_seed(self, step: int) -> int:
        """The augmentation seed of batch ``step`` of the current epoch on this rank."""
        return ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + step * 4_099 + self.rank) % (2**63)

    def __iter__(self) -> Iterator[tuple[list[Tensor], Tensor, int]]:
        batches = self._prepared_batches()
        if self.prefetch:
            batches = _in_background(batches, self._thread_setup)
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for crops, labels, skipped, ready in batches:
            if main is not None and ready is not None:
                main.wait_event(ready)  # the step waits for this batch's kernels only
                for crop in crops:
                    crop.record_stream(main)  # the allocator must not reuse it before the step is done
            yield crops, labels, skipped

    def _thread_setup(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread

    def _prepared_batches(self) -> Iterator[tuple[list[Tensor], Tensor, int, torch.cuda.Event | None]]:
        # On a GPU the batch is prepared on a stream of its own, so that its kernels queue beside the
        # training step's instead of behind them (and the decoder, which waits for its own work, does
        # not wait for the step). An event marks where each batch is complete.
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = self._decoded_batches()
        try:
            while True:
                ready = None
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    item = next(batches, None)  # decoding runs here, on the side stream
                    if item is None:
                        return
                    step, images, labels, skipped = item
                    crops: list[Tensor] = []
                    if len(images):
                        self.generator.manual_seed(self.batch_seed(step))
                        crops = self.augment(images, self.generator)
                    if side is not None:
                        ready = torch.cuda.Event()
                        ready.record(side)
                yield crops, labels, skipped, ready
        finally:
            batches.close()  # stops the DataLoader's workers now when the epoch is left early

    def _decoded_batches(self) -> Generator[tuple[int, Sequence[Tensor] | Tensor, Tensor, int], None, None]:
        """``(step, decoded images, their labels, files skipped)`` for each batch of the epoch."""
        assert self.loader is not None, "a subclass without a DataLoader defines _decoded_batches"
        for step, (encoded, labels, unreadable) in enumerate(self.loader, start=self.start_step):
            decoded = decode_batch(encoded, self.device, self.max_pixels, getattr(encoded, "names", None))
            if decoded.failed:
                failed = set(decoded.failed)
                keep = torch.tensor([i for i in range(len(encoded)) if i not in failed], dtype=torch.long)
                labels = labels[keep]
            yield step, decoded.images, labels, unreadable + len(decoded.failed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, augment={self.augment}, batches={len(self)})"


_END = object()


def _in_background(items: Iterator, setup: Callable[[], None], depth: int = 1) -> Iterator:
    """Iterate ``items`` in a background thread, keeping up to ``depth`` items ready ahead.

    An exception raised by ``items`` is raised here, in the consumer. When the consumer stops early
    (break, exception, garbage collection), the thread is told to stop, closes ``items`` after the item
    it is producing, and is joined — so the wrapped DataLoader iterator is shut down before this returns.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            setup()
            for item in items:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="dino-batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
