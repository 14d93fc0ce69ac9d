"""Datasets decoded once and kept in memory (data.in_memory): same crops as decoding batch by batch."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino.config import ConfigError, load_config
from dino.data.datasets import ImageFolderDataset, SkippedImageWarning
from dino.data.gpu_augment import BatchMultiCrop
from dino.data.gpu_loader import DeviceMultiCropLoader, EncodedImageDataset, collate_encoded
from dino.data.in_memory import DecodedImages, InMemoryMultiCropLoader, InMemoryTooLarge
from dino.train.data import build_train_data
from dino.train.loop import train

from .conftest import TINY_OVERRIDES


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """Two classes of 24×24 JPEGs, one PNG, and a corrupt file in the second class."""
    root = tmp_path / "data"
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(7):
            (root / name / f"{i:02d}.jpg").write_bytes(_jpeg(10 * c + i, (24, 24)))
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(root / "cats" / "07.png")
    (root / "dogs" / "03.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 3)
    return root


def _augment() -> BatchMultiCrop:
    return BatchMultiCrop(local_crops_number=2, global_crop_size=16, local_crop_size=8)


def _batches(loader) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        return list(loader)


def test_in_memory_batches_equal_decoding_batch_by_batch_and_resume_mid_epoch(folder: Path) -> None:
    dataset = ImageFolderDataset(folder)
    with pytest.warns(SkippedImageWarning, match="03.jpg"):
        images = DecodedImages(dataset, "cpu")
    assert images.skipped == 1 and len(images) == 15
    assert isinstance(images.images, torch.Tensor) and images.images.shape == (14, 3, 24, 24)
    streamed = DeviceMultiCropLoader(
        DataLoader(EncodedImageDataset(dataset), batch_size=4, collate_fn=collate_encoded, drop_last=True),
        _augment(),
        "cpu",
        seed=5,
    )
    kept = InMemoryMultiCropLoader(images, range(len(dataset)), 4, _augment(), seed=5)
    a, b = _batches(streamed), _batches(kept)
    assert len(a) == len(b) == len(kept) == 3  # 15 files, the last incomplete batch dropped
    assert [skipped for *_, skipped in b] == [0, 0, 1]  # dogs/03.jpg is file 11 (8 cats before it)
    for (crops_a, labels_a, skipped_a), (crops_b, labels_b, skipped_b) in zip(a, b, strict=True):
        assert skipped_a == skipped_b and torch.equal(labels_a, labels_b)
        assert all(torch.equal(x, y) for x, y in zip(crops_a, crops_b, strict=True))
    # (index, seed) pairs from the training sampler, resumed at batch 1 of the epoch.
    resumed = InMemoryMultiCropLoader(images, [(i, 0) for i in range(4, 15)], 4, _augment(), seed=5)
    resumed.set_epoch(0, start_step=1)
    first = _batches(resumed)[0]
    assert all(torch.equal(x, y) for x, y in zip(first[0], b[1][0], strict=True))


def test_images_of_several_sizes_are_kept_as_a_list(tmp_path: Path) -> None:
    for i, size in enumerate([(20, 30), (24, 24), (31, 17)]):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i, size))
    images = DecodedImages(ImageFolderDataset(tmp_path), "cpu")
    assert isinstance(images.images, list)
    assert [tuple(x.shape) for x in images.images] == [(3, 30, 20), (3, 24, 24), (3, 17, 31)]
    batch, labels, skipped = images.batch([2, 0])
    assert [tuple(x.shape) for x in batch] == [(3, 17, 31), (3, 30, 20)] and skipped == 0
    crops, _, _ = next(iter(InMemoryMultiCropLoader(images, range(3), 3, _augment())))
    assert [tuple(c.shape) for c in crops] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 2


def test_images_stay_a_list_when_stacking_them_would_not_fit(folder: Path, monkeypatch) -> None:
    import dino.data.in_memory as in_memory

    monkeypatch.setattr(in_memory, "memory_budget", lambda device: 0)  # nothing free after decoding
    with pytest.warns(SkippedImageWarning):
        images = DecodedImages(ImageFolderDataset(folder), "cpu", budget=10**9)
    assert isinstance(images.images, list) and len(images.images) == 14
    batch, labels, skipped = images.batch([0, 13, 14])
    assert [tuple(x.shape) for x in batch] == [(3, 24, 24)] * 3 and skipped == 0


def test_a_dataset_over_the_memory_budget_is_refused_before_decoding(folder: Path, monkeypatch) -> None:
    import dino.data.in_memory as in_memory

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the header sample said it does not fit")

    monkeypatch.setattr(in_memory, "decode_batch", no_decoding)
    with pytest.raises(InMemoryTooLarge, match=r"data\.in_memory.*data\.in_memory=false"):
        DecodedImages(ImageFolderDataset(folder), "cpu", budget=12 * 3 * 24 * 24)  # 14 readable images


def test_the_running_total_refuses_what_the_sample_underestimated(folder: Path, monkeypatch) -> None:
    import dino.data.in_memory as in_memory

    monkeypatch.setattr(in_memory, "_jpeg_pixels", lambda path: 1)  # headers that say the images are tiny
    with pytest.raises(InMemoryTooLarge, match="the first 8 images take"):
        DecodedImages(ImageFolderDataset(folder), "cpu", budget=7 * 3 * 24 * 24, chunk=8)


def test_in_memory_needs_the_batched_augmentation(small_folder: Path) -> None:
    with pytest.raises(ConfigError, match="data.augment_on=device"):
        load_config(None, ["data.in_memory=true", "data.augment_on=workers"])
    cfg = load_config(None, TINY_OVERRIDES + [f"data.path={small_folder}", "data.in_memory=true"])
    with pytest.raises(ConfigError, match="loader workers on cpu"):  # auto = workers on the CPU
        build_train_data(cfg, 0, 1, torch.device("cpu"))


def test_a_dataset_too_large_for_memory_is_a_configuration_error(small_folder: Path, monkeypatch) -> None:
    import dino.data.in_memory as in_memory

    monkeypatch.setattr(in_memory, "memory_budget", lambda device: 1000)  # bytes
    overrides = [f"data.path={small_folder}", "data.in_memory=true", "data.augment_on=device"]
    cfg = load_config(None, TINY_OVERRIDES + overrides)
    with pytest.raises(ConfigError, match=r"GiB decoded.*data\.in_memory=false"):
        build_train_data(cfg, 0, 1, torch.device("cpu"))


def _losses(run: Path) -> list[float]:
    return [
        r["loss"]
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if r["type"] == "iter"
    ]


@pytest.mark.slow
def test_training_in_memory_gives_the_losses_of_decoding_batch_by_batch(small_folder, tmp_path):
    common = TINY_OVERRIDES + [f"data.path={small_folder}", "data.augment_on=device", "run.deterministic=true",
                               "run.epochs=1"]  # fmt: skip
    train(load_config(None, common + [f"run.output_dir={tmp_path / 'streamed'}"]))
    train(load_config(None, common + [f"run.output_dir={tmp_path / 'kept'}", "data.in_memory=true"]))
    streamed, kept = _losses(tmp_path / "streamed"), _losses(tmp_path / "kept")
    assert len(streamed) == 3 and streamed == kept


def test_the_host_budget_is_shared_by_the_nodes_processes(monkeypatch) -> None:
    import dino.data.in_memory as in_memory

    monkeypatch.setattr(in_memory, "_host_available", lambda: 8 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert in_memory.memory_budget(torch.device("cpu")) == 4 * 2**30  # half of what is available
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes, one copy each
    assert in_memory.memory_budget(torch.device("cpu")) == 2**30
