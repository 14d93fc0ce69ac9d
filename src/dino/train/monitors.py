"""Run monitors: collapse detection from the teacher entropy / KL, and the online k-NN accuracy."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dino.data.datasets import ImageFolderDataset
from dino.data.transforms import EvalTransform
from dino.eval.features import extract_features
from dino.eval.knn import knn_accuracy

log = logging.getLogger(__name__)

REMEDIES = {
    "one_dimension": (
        "the teacher output collapsed onto one dimension (entropy → 0): centering is too weak for the sharpening; "
        "raise loss.teacher_temp slightly or lower loss.center_momentum, and check teacher.mode/momentum"
    ),
    "uniform": (
        "the teacher output collapsed to the uniform distribution (entropy → ln K): the teacher is not sharp enough; "
        "lower loss.teacher_temp (0.04, warm up to at most 0.07), use a smaller head.out_dim (K), "
        "or raise teacher.momentum"
    ),
    "no_signal": (
        "KL(teacher‖student) → 0: student and teacher give the same constant output, nothing is learned; "
        "lower loss.teacher_temp, use a smaller head.out_dim, or raise teacher.momentum"
    ),
}


@dataclass
class CollapseMonitor:
    """Warns once per kind of collapse, after ``patience`` consecutive suspicious log points."""

    out_dim: int
    low_fraction: float = 0.02  # entropy below this fraction of ln K
    high_fraction: float = 0.98  # entropy above this fraction of ln K
    min_kl: float = 1e-3
    patience: int = 3
    _streaks: dict[str, int] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def check(self, teacher_entropy: float, kl: float) -> list[str]:
        """Kinds of collapse newly diagnosed at this point (also logged as warnings)."""
        ln_k = math.log(self.out_dim)
        signs = {
            "one_dimension": teacher_entropy < self.low_fraction * ln_k,
            "uniform": teacher_entropy > self.high_fraction * ln_k,
            "no_signal": kl < self.min_kl,
        }
        new = []
        for kind, suspicious in signs.items():
            self._streaks[kind] = self._streaks.get(kind, 0) + 1 if suspicious else 0
            if self._streaks[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                new.append(kind)
                log.warning(
                    "possible collapse (teacher entropy %.4f, ln K %.4f, KL %.5f): %s",
                    teacher_entropy,
                    ln_k,
                    kl,
                    REMEDIES[kind],
                )
        return new


class OnlineKNN:
    """Weighted k-NN accuracy of a backbone on a labelled held-out folder, with a labelled bank folder."""

    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path,
        crop_size: int,
        resize: int,
        mean: list[float],
        std: list[float],
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        transform = EvalTransform(resize=resize, crop_size=crop_size, mean=mean, std=std)
        self.train = ImageFolderDataset(train_dir, transform=transform, labelled=True)
        self.val = ImageFolderDataset(val_dir, transform=transform, labelled=True)
        if self.train.classes != self.val.classes:
            raise ValueError(
                f"k-NN monitor: class folders differ between {train_dir} and {val_dir}; they must name the same classes"
            )
        self.k, self.temperature = k, temperature
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(
        self, backbone: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        args = (device, self.batch_size, self.num_workers, autocast_dtype)
        train_f, train_y = extract_features(backbone, self.train, *args)
        val_f, val_y = extract_features(backbone, self.val, *args)
        acc = knn_accuracy(
            train_f,
            train_y,
            val_f,
            val_y,
            ks=(self.k,),
            temperature=self.temperature,
            num_classes=len(self.train.classes),
        )
        top1, top5 = acc[self.k]
        return {"knn_top1": top1, "knn_top5": top5}
