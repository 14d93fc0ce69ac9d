"""Frozen-feature extraction: a backbone over a labelled folder, batched, on any device."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dino.data.datasets import collate_skipping_bad


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Backbone outputs ([CLS] for a ViT) and labels for every decodable image, on the CPU."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
    )
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, targets, _ in loader:
            if images is None or len(targets) == 0:
                continue
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = backbone(images)
            features.append(out.float().cpu())
            labels.append(targets)
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("no image could be decoded for feature extraction")
    return torch.cat(features), torch.cat(labels)
