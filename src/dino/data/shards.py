"""WebDataset tar shards: written from an image folder, and read back for training in an exact, resumable order.

``dino shards SRC OUT --shard-size N`` (:func:`write_shards`) stores each image file's bytes unchanged in
``OUT/shard-000000.tar``, ``shard-000001.tar``… (the ``webdataset`` package's :class:`~webdataset.TarWriter`):
one sample per image, keyed by its position in the folder's sorted order, with its class index (``cls``) when
the folder has class sub-folders and its relative path (``path``). The images go in a seeded random order, so
that a shard mixes the classes. ``OUT/shards.json`` records each shard's number of samples and the class
names: training needs the counts to split an epoch exactly without reading every shard first.

``data.path`` ending in ``.tar`` (a brace pattern such as ``OUT/shard-{000000..000099}.tar``, or one file) is
read as shards (:class:`ShardSet`). An epoch is one stream: the shards in an order drawn from (run seed,
epoch), each shard's samples in an order drawn from (run seed, epoch, shard). Process ``r`` of ``W`` takes the
``r``-th of ``W`` equal contiguous parts of the stream (the few samples left over are dropped for the epoch, as
for folders), and its loader workers take whole batches in turn (worker ``u`` of ``U`` the steps ``u``, ``u +
U``…: the order in which the DataLoader hands them out). So the data order, and with the per-sample seeds of
:mod:`dino.train.data` the crops, depend on the run seed, the epoch, the number of processes and the batch size,
not on the number of workers; a run resumed mid-epoch goes on at the very step, shard and sample where it
stopped. A worker reads every shard its process's part touches, one at a time, and decodes only its own
batches: on a local disk the workers, which move in step, read each shard from the page cache after the
first. A sample that cannot be decoded (or a tar cut short) is skipped with one warning and counted, as a bad
file of a folder is.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dino.data.datasets import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageDecodeError,
    ImageFolderDataset,
    SkippedImageWarning,
    load_rgb,
)

log = logging.getLogger(__name__)

SHARD_INDEX = "shards.json"
SHARD_INDEX_FORMAT = "dino-shards"
SHARD_NAME = "shard-%06d.tar"
IMAGE_KEYS: tuple[str, ...] = tuple(sorted(e.removeprefix(".") for e in IMAGE_EXTENSIONS))
"""Sample entries read as the image (the file extensions of :data:`IMAGE_EXTENSIONS`, without the dot)."""


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError as err:  # an optional extra
        raise DatasetError(
            "WebDataset shards need the webdataset package: pip install 'dino[shards]'"
        ) from err
    return webdataset


def is_shard_pattern(path: str | os.PathLike[str]) -> bool:
    """Whether ``data.path`` names WebDataset shards (it ends in ``.tar``) rather than an image folder."""
    return str(path).endswith(".tar")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


# --- Writing ---------------------------------------------------------------------------------------------


def write_shards(
    source: str | os.PathLike[str], out_dir: str | os.PathLike[str], shard_size: int, seed: int | None = 0
) -> ShardSet:
    """Every image file under ``source`` into tar shards of ``shard_size`` samples in ``out_dir`` (created),
    plus ``shards.json``; ``seed`` orders the images (None: the folder's sorted order). The files' bytes are
    copied, not decoded: an unreadable image is carried over and skipped when read, as in the folder.

    Raises:
        DatasetError: ``source`` is not an image folder, ``shard_size`` is under 1, or ``out_dir`` already
            holds shards (nothing is overwritten).
    """
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1 sample, got {shard_size}")
    wds = _webdataset()
    folder = ImageFolderDataset(source)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file; give a folder for the shards")
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if existing or (out / SHARD_INDEX).exists():
        raise DatasetError(
            f"{out} already holds shards ({len(existing)} shard-*.tar, {SHARD_INDEX}); give an empty or new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(folder)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    counts: list[int] = []
    for first in range(0, len(order), shard_size):
        name = SHARD_NAME % len(counts)
        part = order[first : first + shard_size]
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
            for index in part:
                writer.write(_sample_of(folder, index))
        tmp.replace(out / name)
        counts.append(len(part))
    listing = {
        "format": SHARD_INDEX_FORMAT,
        "version": 1,
        "source": str(folder.root.resolve()),
        "labelled": folder.labelled,
        "classes": folder.classes,
        "samples": len(order),
        "shards": [{"name": SHARD_NAME % i, "samples": n} for i, n in enumerate(counts)],
    }
    (out / SHARD_INDEX).write_text(json.dumps(listing, indent=1) + "\n")
    return ShardSet.open(shard_pattern(out, len(counts)))


def shard_pattern(out_dir: str | os.PathLike[str], count: int) -> str:
    """The brace pattern naming the ``count`` shards :func:`write_shards` wrote into ``out_dir``."""
    return str(Path(out_dir) / f"shard-{{{0:06d}..{count - 1:06d}}}.tar")


def _sample_of(folder: ImageFolderDataset, index: int) -> dict[str, Any]:
    path, label = folder.samples[index]
    relative = path.relative_to(folder.root).as_posix()
    sample: dict[str, Any] = {
        "__key__": f"{index:09d}",
        path.suffix.lower().removeprefix("."): path.read_bytes(),
        "path": relative.encode("utf-8", "surrogateescape"),
    }
    if folder.labelled:
        sample["cls"] = str(label).encode()
    return sample


# --- Reading ---------------------------------------------------------------------------------------------


def shard_pattern_problem(pattern: str) -> str | None:
    """What is wrong with a shard pattern, found without reading a shard (None: nothing): it names no file,
    or local shards that do not exist. Remote URLs are left to WebDataset."""
    try:
        _expand_and_check(pattern)
    except DatasetError as err:
        return str(err)
    return None


def _expand_and_check(pattern: str) -> tuple[tuple[str, ...], bool]:
    """The URLs ``pattern`` names and whether they are remote; local ones checked to exist."""
    wds = _webdataset()
    urls = tuple(wds.shardlists.expand_urls(str(pattern))) if str(pattern).strip() else ()
    if not urls or not all(u.strip() for u in urls):
        raise DatasetError(
            f"the shard pattern {pattern!r} names no file; e.g. OUT/shard-{{000000..000099}}.tar"
        )
    remote = any(_is_remote(u) for u in urls)
    if not remote:
        missing = [u for u in urls if not Path(u).expanduser().is_file()]
        if missing:
            raise DatasetError(
                f"{len(missing)} of the {len(urls)} shards {pattern!r} names do not exist (e.g. {missing[0]}); "
                "check the pattern's range against the files"
            )
    return urls, remote


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its image bytes (None when it has none), its label (-1: none) and a name."""

    image: bytes | None
    label: int
    name: str


@dataclass(frozen=True)
class ShardSet:
    """The shards a pattern names, with their sample counts (from ``shards.json``, or from the tar headers
    of local shards without one) and the class names when the shards were written from a labelled folder."""

    pattern: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    labelled: bool

    @classmethod
    def open(cls, pattern: str) -> ShardSet:
        """Expand ``pattern`` (braces, ``::``-joined lists) and check that the shards are there, before any is
        read. Remote URLs (``https://``, ``pipe:``…) are WebDataset's business: they are not checked here and
        need a ``shards.json`` beside them."""
        urls, remote = _expand_and_check(pattern)
        urls = tuple(u if remote else str(Path(u).expanduser()) for u in urls)
        index = _read_index(urls[0], remote)
        base = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
        known = {f"{base}/{entry['name']}": int(entry["samples"]) for entry in index.get("shards", [])}
        counts = []
        for url in urls:  # a shard of another folder (a ::-joined pattern) is counted, not looked up by name
            name = url if "/" in url else f"./{url}"
            if name in known:
                counts.append(known[name])
            elif remote:
                raise DatasetError(
                    f"{url}: remote shards need their sample counts in {SHARD_INDEX} beside them (dino shards writes it)"
                )
            else:
                counts.append(count_samples(url))
        if sum(counts) == 0:
            raise DatasetError(f"the shards {pattern} hold no sample")
        classes = tuple(index.get("classes", []))
        return cls(
            str(pattern), urls, tuple(counts), classes, bool(index.get("labelled", False)) and bool(classes)
        )

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def root(self) -> str:
        """Where the shards are, for messages (the pattern)."""
        return self.pattern

    def read(self, shard: int) -> list[ShardSample]:
        """The samples of shard ``shard``, in the order they are stored. A tar that cannot be read to its end
        gives the samples before the damage (one warning); the missing ones count as unreadable."""
        url = self.urls[shard]
        wds = _webdataset()
        samples: list[ShardSample] = []
        try:
            for raw in wds.tariterators.tarfile_samples([{"url": url}]):
                samples.append(_shard_sample(raw, url))
        except Exception as exc:  # tarfile, gzip and stream errors of a damaged or vanished shard
            warnings.warn(
                f"skipping the rest of {url} after {len(samples)} samples: cannot read it ({type(exc).__name__}: {exc})",
                SkippedImageWarning,
                stacklevel=2,
            )
        return samples


def _read_index(first_url: str, remote: bool) -> dict[str, Any]:
    base = first_url.rsplit("/", 1)[0] if "/" in first_url else "."
    location = f"{base}/{SHARD_INDEX}"
    try:
        if remote:
            with _webdataset().gopen(location, "rb") as stream:
                data = json.loads(stream.read())
        else:
            if not Path(location).is_file():
                return {}
            data = json.loads(Path(location).read_text())
    except (OSError, ValueError) as err:
        if remote:
            raise DatasetError(f"cannot read {location} ({err}); remote shards need it") from err
        raise DatasetError(f"{location} is not a readable shard index ({err}); fix or delete it") from err
    if data.get("format") != SHARD_INDEX_FORMAT:
        raise DatasetError(f"{location} is not a shard index written by `dino shards`; move it away")
    return data


def count_samples(path: str) -> int:
    """Samples in a local tar shard (distinct keys: the file name up to its first dot), from its headers."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    folder, name = os.path.split(member.name)
                    keys.add(os.path.join(folder, name.split(".", 1)[0]))
    except (OSError, tarfile.TarError) as err:
        raise DatasetError(f"cannot read the shard {path} ({err}); check or remove it") from err
    return len(keys)


def _shard_sample(raw: dict[str, Any], url: str) -> ShardSample:
    name = f"{url}#{raw.get('__key__', '?')}"
    image = next((raw[k] for k in raw if k.lower() in IMAGE_KEYS), None)
    label = raw.get("cls")
    try:
        value = int(label.decode() if isinstance(label, bytes) else label) if label is not None else -1
    except ValueError:
        value = -1
    return ShardSample(image, value, name)


def decode_sample(
    sample: ShardSample | None, max_pixels: int | None, reduction: Callable[[int, int], float] | None
) -> tuple[Any, int] | None:
    """``(RGB PIL image, label)`` of a sample, or None (with a :class:`SkippedImageWarning` naming it) when it
    has no image or the image cannot be decoded."""
    if sample is None:
        return None
    if not sample.image:
        warnings.warn(f"skipping {sample.name}: no image in the sample", SkippedImageWarning, stacklevel=2)
        return None
    try:
        return load_rgb(io.BytesIO(sample.image), max_pixels, reduction), sample.label
    except ImageDecodeError as exc:
        warnings.warn(f"skipping {sample.name}: {exc}", SkippedImageWarning, stacklevel=2)
        return None


# --- The training stream ---------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """An epoch of shards as this process's training samples, in the order the module describes.

    ``item(sample, seed)`` turns a :class:`ShardSample` (None: missing from a damaged shard) into a loader item
    under the sample's seed (None for an unusable sample; the collate function drops and counts those). Use
    with a DataLoader of ``batch_size`` and ``drop_last=True``; :meth:`set_epoch` before each epoch's iterator.
    """

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        item: Callable[[ShardSample | None, int], Any],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shards, self.batch_size, self.item = shards, batch_size, item
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration covers ``epoch`` from this process's ``start``-th sample on (a whole batch)."""
        if start % self.batch_size:
            raise ValueError(f"a shard stream starts at a whole batch, not at sample {start}")
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return len(self.shards) // self.world_size

    def iters_per_epoch(self) -> int:
        return self.per_rank() // self.batch_size

    def shard_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards.urls), generator=generator).tolist()

    def sample_order(self, epoch: int, shard: int) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 100_003 + shard)
        return torch.randperm(self.shards.counts[shard], generator=generator).tolist()

    def steps(self) -> range:
        """The steps this loader worker serves (all of them in the main process)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start // self.batch_size
        return range(first + worker, self.iters_per_epoch(), workers)

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(position in this process's part, position in the epoch's stream)`` of every sample this worker
        yields, in order."""
        part_start = self.rank * self.per_rank()
        for step in self.steps():
            for i in range(step * self.batch_size, (step + 1) * self.batch_size):
                yield i, part_start + i

    def __iter__(self) -> Iterator[Any]:
        order = self.shard_order(self.epoch)
        starts = [0]
        for shard in order:
            starts.append(starts[-1] + self.shards.counts[shard])
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        loaded: tuple[int, list[ShardSample], list[int]] | None = None
        for mine, position in self.positions():
            slot = bisect_right(starts, position) - 1
            shard = order[slot]
            if loaded is None or loaded[0] != shard:  # the previous shard is dropped: one in memory at a time
                loaded = (shard, self.shards.read(shard), self.sample_order(self.epoch, shard))
            _, samples, within = loaded
            stored = within[position - starts[slot]]
            sample = samples[stored] if stored < len(samples) else None
            if sample is None:
                warnings.warn(
                    f"skipping sample {stored} of {self.shards.urls[shard]}: the shard ends before it",
                    SkippedImageWarning,
                    stacklevel=2,
                )
            yield self.item(sample, (base + mine * self.world_size + self.rank) % (2**63))


def check_shards_usable(shards: ShardSet, min_valid_fraction: float, sample_size: int = 64) -> int:
    """Decode up to ``sample_size`` samples of the first shards and fail fast, as
    :func:`~dino.data.datasets.check_usable` does for a folder, when too many cannot be used. Returns how many
    were checked."""
    checked, failures = 0, []
    for shard in range(len(shards.urls)):
        for sample in shards.read(shard)[: sample_size - checked]:
            checked += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SkippedImageWarning)
                if decode_sample(sample, None, None) is None:
                    failures.append(sample.name)
        if checked >= sample_size:
            break
    if checked and (checked - len(failures)) / checked < min_valid_fraction:
        raise DatasetError(
            f"too many samples of {shards.pattern} cannot be decoded: {len(failures)} of the first {checked} "
            f"failed, more than the {1.0 - min_valid_fraction:.0%} that min_valid_fraction={min_valid_fraction:g} "
            f"allows (e.g. {failures[0]}); check the shards, or lower data.min_valid_fraction"
        )
    return checked
