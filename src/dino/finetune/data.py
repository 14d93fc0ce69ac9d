"""Fine-tuning data: DeiT's augmentation from timm, labelled folders, resumable loaders, Mixup/CutMix.

The training transform is timm's ``create_transform`` (random-resized crop, flip, RandAugment, random
erasing); batches are mixed by timm's ``Mixup`` (Mixup or CutMix, label smoothing folded into the soft
targets). Every random draw is seeded from the run's seed and the sample's or step's position
(:class:`~dino.train.data.SeededDataset`, :class:`~dino.train.data.ResumableSampler`,
:class:`SeededMixup`), so a run resumed mid-epoch sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from dino.data.datasets import DatasetError, ImageFolderDataset, check_usable, collate_skipping_bad
from dino.finetune.config import FinetuneConfig, mixes
from dino.train.data import ResumableSampler, SeededDataset, _ignore_stop_signals, resolve_num_workers


def train_transform(cfg: FinetuneConfig) -> Callable:
    """DeiT's training augmentation, built by timm from the config's ``data`` and ``augment`` sections."""
    from timm.data import create_transform

    d, a = cfg.data, cfg.augment
    return create_transform(
        input_size=d.img_size,
        is_training=True,
        scale=(d.scale[0], d.scale[1]),
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        auto_augment=a.auto_augment,
        interpolation=d.interpolation,
        mean=tuple(d.mean),
        std=tuple(d.std),
        re_prob=a.re_prob,
        re_mode=a.re_mode,
        re_count=a.re_count,
    )


def eval_transform(cfg: FinetuneConfig) -> Callable:
    """Resize to ``img_size / crop_pct`` (bicubic), centre crop ``img_size``, normalise (DeiT's test view)."""
    from timm.data import create_transform

    d = cfg.data
    interpolation = "bicubic" if d.interpolation == "random" else d.interpolation
    return create_transform(
        input_size=d.img_size,
        is_training=False,
        interpolation=interpolation,
        crop_pct=d.crop_pct,
        mean=tuple(d.mean),
        std=tuple(d.std),
    )


def labelled_folder(
    root: str, transform: Callable, what: str, min_valid_fraction: float
) -> ImageFolderDataset:
    """A labelled folder (one sub-folder per class), sampled for decodable files before training."""
    dataset = ImageFolderDataset(root, transform=transform, min_valid_fraction=min_valid_fraction)
    if not dataset.labelled:
        raise DatasetError(
            f"data.{what} {root} has no class sub-folders; fine-tuning needs labels: <folder>/<class>/<image>"
        )
    check_usable(dataset)
    return dataset


def check_same_classes(train: ImageFolderDataset, val: ImageFolderDataset) -> None:
    """The held-out folder's classes must be the training folder's (a class index means the same class)."""
    if train.classes != val.classes:
        missing = sorted(set(val.classes) - set(train.classes))[:5]
        raise DatasetError(
            f"data.val {val.root} has classes the training folder lacks or in another set "
            f"({len(val.classes)} vs {len(train.classes)}; e.g. {missing}); give both folders the same "
            "class sub-folders"
        )


@dataclass
class FinetuneData:
    train: ImageFolderDataset
    val: ImageFolderDataset
    sampler: ResumableSampler
    loader: DataLoader
    val_loader: DataLoader
    iters_per_epoch: int

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def set_epoch(self, epoch: int, step: int, batch_size: int) -> None:
        """Start ``epoch`` at batch ``step``: the same order and the same augmentations."""
        self.sampler.set_epoch(epoch, start=step * batch_size)


def build_finetune_data(cfg: FinetuneConfig, rank: int = 0, world_size: int = 1) -> FinetuneData:
    """Both folders, checked, and their loaders (training: seeded per sample, split across processes)."""
    d, r = cfg.data, cfg.run
    assert d.train is not None and d.val is not None  # validated
    train = labelled_folder(d.train, train_transform(cfg), "train", d.min_valid_fraction)
    val = labelled_folder(d.val, eval_transform(cfg), "val", d.min_valid_fraction)
    check_same_classes(train, val)
    sampler = ResumableSampler(len(train), r.seed, rank, world_size)
    iters = sampler.per_rank() // r.batch_size
    if iters == 0:
        raise DatasetError(
            f"{d.train} gives {sampler.per_rank()} images per process, fewer than run.batch_size={r.batch_size}: "
            "lower run.batch_size"
        )
    workers = resolve_num_workers(d.num_workers)
    loader = DataLoader(
        SeededDataset(train),
        batch_size=r.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate_skipping_bad,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals,
        generator=torch.Generator().manual_seed(r.seed * 1_000_003 + rank),
    )
    val_loader = DataLoader(
        val, batch_size=r.batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping_bad
    )
    return FinetuneData(train, val, sampler, loader, val_loader, iters)


class SeededMixup:
    """timm's Mixup/CutMix with soft targets (label smoothing folded in), its random draws seeded by
    (run seed, iteration, rank): timm draws from NumPy's global stream, which is saved and put back here,
    so a resumed run mixes its batches as the uninterrupted one did. Without mixing it still gives the
    smoothed one-hot targets, so the loss is one soft-target cross-entropy in every case."""

    def __init__(self, cfg: FinetuneConfig, num_classes: int, rank: int = 0) -> None:
        from timm.data import Mixup

        x = cfg.mixup
        self.enabled = mixes(cfg)
        self.num_classes, self.smoothing = num_classes, x.label_smoothing
        self.seed, self.rank = cfg.run.seed, rank
        self.mixup = Mixup(
            mixup_alpha=x.mixup_alpha,
            cutmix_alpha=x.cutmix_alpha,
            prob=x.prob,
            switch_prob=x.switch_prob,
            mode=x.mode,
            label_smoothing=x.label_smoothing,
            num_classes=num_classes,
        )

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, iteration: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, soft targets [B, classes]); ``images`` mixed in place when mixing is on."""
        if not self.enabled:
            return images, smoothed_targets(labels, self.num_classes, self.smoothing)
        if images.shape[0] % 2:  # an undecodable file left an odd batch: pairs need an even one
            images, labels = images[:-1], labels[:-1]
        state = np.random.get_state()
        np.random.seed((self.seed * 1_000_003 + iteration * 7919 + self.rank) % 2**32)
        try:
            return self.mixup(images, labels)
        finally:
            np.random.set_state(state)


def smoothed_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with ``smoothing`` spread evenly over all classes (the true one keeps
    ``1 − smoothing + smoothing / classes``)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)
