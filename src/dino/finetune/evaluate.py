"""Accuracy of a classifier on a labelled folder: top-1, top-5 and per-class top-1."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dino.eval.knn import topk_hits


@dataclass
class ClassifierAccuracy:
    top1: float  # percent of images
    top5: float
    per_class: dict[str, float]  # top-1 percent of each class's images (NaN for a class without images)
    images: int
    loss: float  # mean cross-entropy against the hard labels

    def as_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "images": self.images,
            "loss": self.loss,
            "per_class_top1": self.per_class,
        }


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, int]],
    classes: Sequence[str],
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> ClassifierAccuracy:
    """Run ``model`` (in eval mode, restored afterwards) over ``batches`` of ``(images, labels, skipped)``
    (a loader with :func:`~dino.data.datasets.collate_skipping_bad`); count top-1/top-5 hits overall and
    top-1 hits per class."""
    was_training = model.training
    model.eval()
    hits = torch.zeros(2, dtype=torch.long)
    per_class_hits = torch.zeros(len(classes), dtype=torch.long)
    per_class_count = torch.zeros(len(classes), dtype=torch.long)
    loss_sum, total = 0.0, 0
    for images, labels, _ in batches:
        if labels.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        logits, labels = logits.float().cpu(), labels.cpu()
        hits += torch.tensor(topk_hits(logits, labels))
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct = logits.argmax(dim=1) == labels
        per_class_hits += torch.bincount(labels[correct], minlength=len(classes))
        per_class_count += torch.bincount(labels, minlength=len(classes))
        total += labels.numel()
    model.train(was_training)
    n = max(total, 1)
    per_class = {
        name: (100.0 * int(h) / int(c) if c else float("nan"))
        for name, h, c in zip(classes, per_class_hits, per_class_count, strict=True)
    }
    return ClassifierAccuracy(
        100.0 * int(hits[0]) / n, 100.0 * int(hits[1]) / n, per_class, total, loss_sum / n
    )
