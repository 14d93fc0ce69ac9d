"""Shared fixtures: a small copy of the bundled sample and a tiny, fast training configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dino.data.sample import sample_dataset

TINY_OVERRIDES = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "model.depth=1",
    "model.drop_path_rate=0.1",
    "head.out_dim=128",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "head.freeze_last_layer=1",
    "data.global_crop_size=32",
    "data.local_crop_size=16",
    "data.local_crops_number=2",
    "data.num_workers=0",
    "optim.lr=0.004",
    "optim.warmup_epochs=1",
    "run.batch_size=16",
    "run.log_every=1",
    "run.progress_bar=never",
]


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """48 labelled CIFAR-10 images (the bundled sample's first classes)."""
    root = tmp_path_factory.mktemp("small")
    source = sample_dataset("train")
    for class_dir in sorted(source.iterdir())[:4]:
        (root / class_dir.name).mkdir()
        for image in sorted(class_dir.iterdir())[:12]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root
