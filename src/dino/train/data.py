"""Training data: the multi-crop dataset, a resumable sampler and per-sample seeded augmentation.

Each sample's augmentation is drawn from a seed derived from (run seed, epoch, position), not from the
worker's random stream, so the crops a run sees do not depend on the number of workers and a run resumed
in the middle of an epoch sees exactly the crops the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dino.config import ConfigError, DataConfig, DINOConfig
from dino.data.datasets import (
    DEFAULT_MAX_PIXELS,
    DatasetError,
    ImageFolderDataset,
    check_usable,
    collate_skipping_bad,
)
from dino.data.gpu_augment import BatchMultiCrop
from dino.data.gpu_loader import DeviceMultiCropLoader, EncodedImageDataset, collate_encoded
from dino.data.in_memory import DecodedImages, InMemoryMultiCropLoader, InMemoryTooLarge
from dino.data.multicrop_spec import MultiCropSpec
from dino.data.sample import sample_dataset
from dino.data.shards import (
    ShardSample,
    ShardSet,
    ShardStream,
    check_shards_usable,
    decode_sample,
    is_shard_pattern,
)
from dino.data.transforms import MultiCropAugmentation
from dino.train.signals import STOP_SIGNALS


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's, Python's and NumPy's random streams seeded with ``seed`` inside, as they were outside (timm's
    RandAugment, used by fine-tuning, draws from NumPy's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is transformed under its own random seed (torch's,
    Python's and NumPy's streams: timm's RandAugment draws from NumPy's)."""

    def __init__(self, dataset: ImageFolderDataset | EncodedImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with seeded(seed):
            return self.dataset[index]


class ShardItems:
    """A shard sample as the loader item a folder's sample would give: the multi-crop views made under the
    sample's seed (``transform``), or the image's bytes for the device to decode (``transform`` None)."""

    def __init__(
        self, transform: MultiCropAugmentation | None, reduction: Callable[[int, int], float] | None
    ) -> None:
        self.transform, self.reduction = transform, reduction

    def __call__(self, sample: ShardSample | None, seed: int) -> Any:
        if self.transform is None:
            if sample is None or not sample.image:
                return decode_sample(sample, None, None)  # None, with its warning
            return torch.frombuffer(bytearray(sample.image), dtype=torch.uint8), sample.label, sample.name
        with seeded(seed):
            decoded = decode_sample(sample, DEFAULT_MAX_PIXELS, self.reduction)
            return None if decoded is None else (self.transform(decoded[0]), decoded[1])


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch permutation (seeded by run seed + epoch), split across processes, startable mid-epoch.

    Yields ``(index, sample_seed)``. Each process gets ``len(dataset) // world_size`` samples (the tail that
    does not divide evenly is dropped for the epoch, a different tail each epoch).
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration covers ``epoch`` from this process's ``start``-th sample on."""
        self.epoch, self.start = epoch, start

    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def __len__(self) -> int:
        return max(self.per_rank() - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[: self.per_rank() * self.world_size]
        mine = order[self.rank :: self.world_size].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for position in range(self.start, len(mine)):
            yield mine[position], (base + position * self.world_size + self.rank) % (2**63)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGUSR2 and Ctrl-C to the main process, which saves a checkpoint before
    stopping (a terminal sends Ctrl-C to the workers too, and one that died of it would fail the next
    batch)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class TrainData:
    dataset: ImageFolderDataset | ShardSet
    sampler: ResumableSampler | ShardStream  # the stream of shards is its own sampler
    # All yield (crops, labels, number of unreadable files); the in-memory loader is a DeviceMultiCropLoader.
    loader: DataLoader | DeviceMultiCropLoader
    iters_per_epoch: int

    def set_epoch(self, epoch: int, step: int, batch_size: int) -> None:
        """Start ``epoch`` at batch ``step`` (mid-epoch resume): same data order and same crops."""
        self.sampler.set_epoch(epoch, start=step * batch_size)
        if isinstance(self.loader, DeviceMultiCropLoader):
            self.loader.set_epoch(epoch, step)


def resolve_num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return min(8, os.cpu_count() or 1)


def augment_on_device(cfg: DINOConfig, device: torch.device) -> bool:
    if cfg.data.augment_on == "auto":
        return device.type == "cuda"
    return cfg.data.augment_on == "device"


def build_train_data(cfg: DINOConfig, rank: int, world_size: int, device: torch.device) -> TrainData:
    """Dataset + multi-crop augmentation + resumable sampler + loader, checked before any training.

    With augmentation on the device, loader workers only read file bytes; decoding (batched nvjpeg on a GPU)
    and the multi-crop augmentation of the whole batch run on ``device``, with per-sample parameters
    drawn from a generator seeded by (seed, epoch, step, rank).
    """
    d = cfg.data
    root = d.path if d.path is not None else sample_dataset("train")
    if is_shard_pattern(root):
        return _shard_train_data(cfg, str(root), rank, world_size, device)
    on_device = augment_on_device(cfg, device)
    if d.in_memory and not on_device:  # before the folder is scanned and sampled for decodability
        raise ConfigError(
            f"data.in_memory: the augmentation runs in loader workers on {device} (data.augment_on="
            f"{d.augment_on}); set data.augment_on=device to augment the decoded images in batches"
        )
    crops = _crop_spec(d)
    transform = None if on_device else MultiCropAugmentation(crops)
    reduction = transform.decode_reduction if transform is not None and d.reduced_decode else None
    dataset = ImageFolderDataset(
        root, transform=transform, min_valid_fraction=d.min_valid_fraction, decode_reduction=reduction
    )
    _check_dataset(cfg, dataset, root, world_size)
    sampler = ResumableSampler(len(dataset), cfg.run.seed, rank, world_size)
    iters_per_epoch = sampler.per_rank() // cfg.run.batch_size
    workers = resolve_num_workers(d.num_workers)
    if d.in_memory:
        loader = _in_memory_loader(cfg, dataset, sampler, device, BatchMultiCrop(crops), rank, workers)
        return TrainData(dataset, sampler, loader, iters_per_epoch)
    files = _file_loader(cfg, dataset, sampler, device, on_device, rank, workers)
    if on_device:
        augment = BatchMultiCrop(crops)
        device_loader = DeviceMultiCropLoader(files, augment, device, seed=cfg.run.seed, rank=rank)
        return TrainData(dataset, sampler, device_loader, iters_per_epoch)
    return TrainData(dataset, sampler, files, iters_per_epoch)


def _shard_train_data(
    cfg: DINOConfig, pattern: str, rank: int, world_size: int, device: torch.device
) -> TrainData:
    """WebDataset shards (:mod:`dino.data.shards`) as training data: checked (present, counted, decodable,
    large enough), then split across processes and loader workers in an order that resumes exactly."""
    d = cfg.data
    if d.in_memory:
        raise ConfigError(
            "data.in_memory decodes an image folder; with WebDataset shards set data.in_memory=false"
        )
    try:
        shards = ShardSet.open(pattern)
    except DatasetError as err:
        raise ConfigError(f"data.path: {err}") from err
    batch, total = cfg.run.batch_size, cfg.run.batch_size * world_size
    if len(shards) < total:
        raise ConfigError(
            f"run.batch_size: {batch} per process × {world_size} process(es) = {total} is larger than the dataset "
            f"({len(shards)} samples in {pattern}); lower run.batch_size"
        )
    if cfg.monitor.knn_every and cfg.monitor.knn_train is None:
        raise ConfigError(
            "monitor.knn_train: the k-NN monitor reads its bank from an image folder, and the training data are "
            "shards; give a labelled folder (monitor.knn_train=DIR) or set monitor.knn_every=0"
        )
    check_shards_usable(shards, d.min_valid_fraction)
    on_device = augment_on_device(cfg, device)
    crops = _crop_spec(d)
    transform = None if on_device else MultiCropAugmentation(crops)
    reduction = transform.decode_reduction if transform is not None and d.reduced_decode else None
    stream = ShardStream(shards, batch, ShardItems(transform, reduction), cfg.run.seed, rank, world_size)
    workers = resolve_num_workers(d.num_workers)
    files = DataLoader(stream, batch_size=batch, **_loader_options(cfg, device, on_device, rank, workers))
    loader: DataLoader | DeviceMultiCropLoader = files
    if on_device:
        loader = DeviceMultiCropLoader(files, BatchMultiCrop(crops), device, seed=cfg.run.seed, rank=rank)
    return TrainData(shards, stream, loader, stream.iters_per_epoch())


def _crop_spec(d: DataConfig) -> MultiCropSpec:
    """The multi-crop settings, checked, as both augmentations (per image in workers, batched on a device)
    take them."""
    return MultiCropSpec.resolve(
        global_crops_scale=d.global_crops_scale,
        local_crops_scale=d.local_crops_scale,
        local_crops_number=d.local_crops_number,
        global_crop_size=d.global_crop_size,
        local_crop_size=d.local_crop_size,
        mean=d.mean,
        std=d.std,
        blur_probs=d.blur_probs,
        solarize_prob=d.solarize_prob,
    )


def _check_dataset(cfg: DINOConfig, dataset: ImageFolderDataset, root: str | Path, world_size: int) -> None:
    """Refuse a dataset the run cannot use: unreadable, smaller than a global batch, or unlabelled where
    the k-NN monitor takes its bank from it."""
    check_usable(dataset)
    batch, total = cfg.run.batch_size, cfg.run.batch_size * world_size
    if len(dataset) < total:
        raise ConfigError(
            f"run.batch_size: {batch} per process × {world_size} process(es) = {total} is larger than the dataset "
            f"({len(dataset)} images in {root}); lower run.batch_size"
        )
    if cfg.monitor.knn_every and cfg.monitor.knn_train is None and not dataset.labelled:
        raise ConfigError(
            f"monitor.knn_train: the k-NN monitor's bank defaults to the training folder, but {root} has no "
            "class sub-folders; give a labelled folder (monitor.knn_train=DIR) or set monitor.knn_every=0"
        )


def _file_loader(
    cfg: DINOConfig,
    dataset: ImageFolderDataset,
    sampler: ResumableSampler,
    device: torch.device,
    on_device: bool,
    rank: int,
    workers: int,
) -> DataLoader:
    """Batches read by ``workers`` processes: multi-crop views augmented there, or the files' bytes for the
    device to decode and augment (``on_device``)."""
    return DataLoader(
        SeededDataset(EncodedImageDataset(dataset) if on_device else dataset),
        batch_size=cfg.run.batch_size,
        sampler=sampler,
        **_loader_options(cfg, device, on_device, rank, workers),
    )


def _loader_options(
    cfg: DINOConfig, device: torch.device, on_device: bool, rank: int, workers: int
) -> dict[str, Any]:
    """The DataLoader settings that reading from a folder and from shards share."""
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda" and not on_device,
        "drop_last": True,
        "collate_fn": collate_encoded if on_device else collate_skipping_bad,
        "persistent_workers": False,
        "prefetch_factor": 4 if workers > 0 else None,
        "worker_init_fn": _ignore_stop_signals,
        # Its own generator: each epoch's iterator draws its workers' base seed from it, not from the
        # process's stream, which stochastic depth draws from and a mid-epoch resume restores to the
        # point of the checkpoint (after that epoch's iterator was made). The crops do not depend on it
        # (every sample is seeded: SeededDataset, ShardItems).
        "generator": torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + rank),
    }


def _in_memory_loader(
    cfg: DINOConfig,
    dataset: ImageFolderDataset,
    sampler: ResumableSampler,
    device: torch.device,
    augment: BatchMultiCrop,
    rank: int,
    threads: int,
) -> InMemoryMultiCropLoader:
    """Every image decoded once onto ``device`` (refused, as a configuration error, when too large)."""
    try:
        images = DecodedImages(dataset, device, threads=max(1, threads))
    except InMemoryTooLarge as err:
        raise ConfigError(str(err)) from err
    return InMemoryMultiCropLoader(images, sampler, cfg.run.batch_size, augment, seed=cfg.run.seed, rank=rank)
