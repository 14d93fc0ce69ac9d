"""WebDataset shards: what `dino shards` writes against the folder it came from, the training stream's order
(split across processes and workers, resumable), bad samples, and training from shards end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dino.cli import main
from dino.config import ConfigError, load_config
from dino.data.datasets import ImageFolderDataset, collate_skipping_bad
from dino.data.shards import (
    SHARD_INDEX,
    ShardSample,
    ShardSet,
    ShardStream,
    shard_pattern_problem,
    write_shards,
)
from dino.train.data import ShardItems, build_train_data
from dino.train.loop import train

from .conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder_with_a_broken_file(small_folder, tmp_path_factory) -> Path:
    """The 48 labelled images plus one file that is not an image (49 samples)."""
    root = tmp_path_factory.mktemp("broken") / "images"
    shutil.copytree(small_folder, root)
    first_class = sorted(p for p in root.iterdir())[0]
    (first_class / "zz_broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def shards(folder_with_a_broken_file, tmp_path_factory) -> ShardSet:
    return write_shards(folder_with_a_broken_file, tmp_path_factory.mktemp("shards") / "out", shard_size=10)


def _tar_members(path: str) -> dict[str, dict[str, bytes]]:
    """The samples of a tar read with the standard library alone: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            handle = tar.extractfile(member)
            assert handle is not None
            samples.setdefault(key, {})[ext] = handle.read()
    return samples


def test_shards_hold_the_folder_images_bytes_and_labels(folder_with_a_broken_file, shards):
    folder = ImageFolderDataset(folder_with_a_broken_file)
    assert len(folder) == 49 and len(shards) == 49 and shards.counts == (10, 10, 10, 10, 9)
    assert list(shards.classes) == folder.classes and shards.labelled
    seen: dict[str, tuple[bytes, int]] = {}
    for url in shards.urls:
        for sample in _tar_members(url).values():
            seen[sample["path"].decode()] = (
                sample.get("jpg") or sample.get("png") or b"",
                int(sample["cls"]),
            )
    assert len(seen) == 49
    for path, label in folder.samples:
        stored, stored_label = seen[path.relative_to(folder.root).as_posix()]
        assert stored == path.read_bytes() and stored_label == label
    # Written shuffled: the first shard mixes classes, and WebDataset's reader gives the same samples
    assert len({int(s["cls"]) for s in _tar_members(shards.urls[0]).values()}) > 1
    read = shards.read(0)
    by_key = _tar_members(shards.urls[0])
    assert [s.image for s in read] == [by_key[s.name.rsplit("#", 1)[1]]["jpg"] for s in read]
    index = json.loads((Path(shards.urls[0]).parent / SHARD_INDEX).read_text())
    assert index["samples"] == 49 and [s["samples"] for s in index["shards"]] == [10, 10, 10, 10, 9]


def test_an_unlabelled_folder_gives_shards_without_labels_and_the_command_prints_the_pattern(
    small_folder, tmp_path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(small_folder.rglob("*.jpg"))[:5]:
        shutil.copy(image, flat / image.name)
    out = tmp_path / "out"
    code = main(
        [
            "shards",
            str(flat),
            str(out),
            "--shard-size",
            "2",
            "--keep-order",
            "--output",
            str(tmp_path / "s.json"),
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["data.path"] == f"{out}/shard-{{000000..000002}}.tar" and summary["samples"] == 5
    assert summary["data.path"] in capsys.readouterr().out
    opened = ShardSet.open(summary["data.path"])
    assert opened.counts == (2, 2, 1) and not opened.labelled and opened.classes == ()
    samples = [sample for shard in range(3) for sample in opened.read(shard)]
    assert [s.label for s in samples] == [-1] * 5
    assert [s.image for s in samples] == [p.read_bytes() for p in sorted(flat.iterdir())]  # --keep-order
    assert all("cls" not in members for members in _tar_members(opened.urls[0]).values())


def test_counts_come_from_the_tar_headers_without_an_index(shards, tmp_path):
    for url in shards.urls:
        shutil.copy(url, tmp_path)
    copied = ShardSet.open(str(tmp_path / "shard-{000000..000004}.tar"))
    assert copied.counts == shards.counts and not copied.labelled


def test_bad_patterns_and_folders_are_refused_before_reading(shards, small_folder, tmp_path, capsys):
    pattern = str(Path(shards.urls[0]).parent / "shard-{000000..000009}.tar")  # 5 of the 10 are missing
    with pytest.raises(ConfigError, match="5 of the 10 shards"):
        load_config(None, [f"data.path={pattern}"])
    assert "names no file" in str(shard_pattern_problem(" "))
    out = Path(shards.urls[0]).parent
    assert main(["shards", str(small_folder), str(out), "--shard-size", "5"]) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert main(["shards", str(small_folder), str(tmp_path / "new"), "--shard-size", "0"]) == 2
    assert "--shard-size must be at least 1" in capsys.readouterr().err


def _names(sample: ShardSample | None, seed: int) -> tuple[str, int]:
    """A loader item naming the sample and its seed (module level: loader workers pickle it)."""
    assert sample is not None
    return sample.name, seed


def _epoch(shards: ShardSet, epoch: int, rank: int, world: int, workers: int, start: int = 0) -> list:
    stream = ShardStream(shards, 4, _names, seed=3, rank=rank, world_size=world)
    stream.set_epoch(epoch, start)
    loader = DataLoader(stream, batch_size=4, num_workers=workers, drop_last=True, collate_fn=list)
    return [item for batch in loader for item in batch]


def test_the_stream_splits_processes_ignores_workers_and_resumes_mid_epoch(shards):
    one = _epoch(shards, 0, 0, 1, 0)
    assert len(one) == 48 and len({name for name, _ in one}) == 48  # 49 // 4 batches, no repeat
    assert _epoch(shards, 0, 0, 1, 2) == one  # two loader workers: the same batches, in the same order
    assert _epoch(shards, 0, 0, 1, 2, start=20) == one[20:]  # resumed at step 5: the rest, exactly
    assert [n for n, _ in _epoch(shards, 1, 0, 1, 0)] != [n for n, _ in one]  # another epoch, another order
    # Two processes: 24 samples each (49 // 2 = 24 = 6 batches), disjoint
    ranks = [_epoch(shards, 0, rank, 2, 1) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [24, 24]
    assert not {n for n, _ in ranks[0]} & {n for n, _ in ranks[1]}
    # Independently: the epoch's stream is the shards in the drawn order, each in its drawn order
    stream = ShardStream(shards, 4, _names, seed=3)
    expected = []
    for shard in stream.shard_order(0):
        samples = shards.read(shard)
        expected += [samples[i].name for i in stream.sample_order(0, shard)]
    assert [n for n, _ in one] == expected[:48]
    assert [n for n, _ in ranks[1]] == expected[24:48]
    assert len({seed for _, seed in one}) == 48


def test_undecodable_samples_and_a_cut_shard_are_skipped_and_counted(shards, tmp_path):
    from dino.data.multicrop_spec import MultiCropSpec
    from dino.data.transforms import MultiCropAugmentation

    spec = MultiCropSpec.resolve(global_crop_size=32, local_crop_size=16, local_crops_number=1)
    stream = ShardStream(shards, 7, ShardItems(MultiCropAugmentation(spec), None), seed=0)
    loader = DataLoader(stream, batch_size=7, drop_last=True, collate_fn=collate_skipping_bad)
    with pytest.warns(UserWarning, match="not a recognised image format"):
        skipped = sum(n for _, _, n in loader)
    assert skipped == 1  # the broken file, once, in the epoch's 49 // 7 * 7 = 49 samples
    # A shard cut in the middle: the samples after the damage are skipped (and warned about), not fatal
    for url in shards.urls:
        shutil.copy(url, tmp_path)
    cut = tmp_path / Path(shards.urls[1]).name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    damaged = ShardSet(str(tmp_path), tuple(str(tmp_path / Path(u).name) for u in shards.urls), shards.counts,
                       shards.classes, True)  # fmt: skip
    stream = ShardStream(damaged, 7, ShardItems(MultiCropAugmentation(spec), None), seed=0)
    loader = DataLoader(stream, batch_size=7, drop_last=True, collate_fn=collate_skipping_bad)
    with pytest.warns(UserWarning):
        batches = list(loader)
    assert len(batches) == 7 and sum(n for _, _, n in batches) >= 2


def test_training_data_from_shards_checks_the_batch_and_the_monitor_bank(shards, small_folder):
    pattern = str(Path(shards.urls[0]).parent / "shard-{000000..000004}.tar")
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.path={pattern}", "monitor.knn_every=1",
                             f"monitor.knn_val={small_folder}"])  # fmt: skip
    with pytest.raises(ConfigError, match="monitor.knn_train"):
        build_train_data(cfg, 0, 1, CPU)
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.path={pattern}", "run.batch_size=30"])
    with pytest.raises(ConfigError, match="larger than the dataset"):
        build_train_data(cfg, 0, 2, CPU)
    cfg = load_config(None, [*TINY_OVERRIDES, f"data.path={pattern}"])
    data = build_train_data(cfg, 0, 1, CPU)
    assert data.iters_per_epoch == 3 and len(data.dataset) == 49


@pytest.mark.slow
def test_training_from_shards_resumes_mid_epoch_bit_exact(shards, tmp_path):
    """Interrupted at a step in the middle of an epoch and resumed (with another number of loader workers),
    a run from shards ends where the uninterrupted one does."""
    pattern = str(Path(shards.urls[0]).parent / "shard-{000000..000004}.tar")
    common = TINY_OVERRIDES + [f"data.path={pattern}", "run.deterministic=true", "run.epochs=2", "model.depth=2",
                               "run.batch_size=8"]  # fmt: skip
    full = tmp_path / "full"
    train(load_config(None, common + [f"run.output_dir={full}", "run.checkpoint_every_iters=4", "run.keep_last=10",
                                      "data.num_workers=2"]))  # fmt: skip
    mid = full / "checkpoints" / "last-000000008.pth"  # 6 steps an epoch: step 2 of epoch 1
    state = torch.load(mid, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    resumed = tmp_path / "resumed"
    train(load_config(None, common + [f"run.output_dir={resumed}"]), resume=mid)
    a = torch.load(full / "teacher_backbone.pth", weights_only=True)
    b = torch.load(resumed / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert sum(r["bad_files"] for r in epochs if r["type"] == "epoch") >= 1  # the broken sample, counted


@pytest.mark.slow
def test_two_processes_train_from_shards_with_the_knn_monitor_on_both(shards, small_folder, tmp_path):
    pattern = str(Path(shards.urls[0]).parent / "shard-{000000..000004}.tar")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dino.cli",
           "train", "--data", pattern, "--output", str(out), *TINY_OVERRIDES, "run.batch_size=8", "run.epochs=1",
           "monitor.knn_every=1", f"monitor.knn_train={small_folder}", f"monitor.knn_val={small_folder}",
           "data.augment_on=device"]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["type"] == "start")
    assert start["world_size"] == 2 and start["iters_per_epoch"] == 3  # 49 // 2 = 24 per process, batch 8
    knn = [r for r in records if r["type"] == "knn"]
    assert [r["epoch"] for r in knn] == [-1, 0] and all(0 <= r["knn_top1"] <= 100 for r in knn)
