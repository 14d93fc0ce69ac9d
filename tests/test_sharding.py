"""Evaluation split across processes: blocks that tile the data, rows gathered in order, and the commands
under torchrun giving the files and numbers of one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino.data.sample import sample_dataset
from dino.eval.features import FeatureSet
from dino.eval.sharding import block_of, gather_rows
from dino.models.backbones import build_backbone

CPU = ["--device", "cpu", "--num-workers", "0", "--batch-size", "4"]


@pytest.mark.parametrize("count", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_blocks_tile_the_positions_without_repeats(count, world_size):
    blocks = [list(block_of(count, rank, world_size)) for rank in range(world_size)]
    assert [i for block in blocks for i in block] == list(range(count))
    lengths = [len(block) for block in blocks]
    assert max(lengths) - min(lengths) <= 1


def _gather_on_two(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # rank 0 has 3 rows, rank 1 none (passes an untyped empty tensor), then 1 row vs 2 rows of ints
        rows = torch.arange(6, dtype=torch.float64).reshape(3, 2) if rank == 0 else torch.empty(0)
        ints = torch.tensor([10]) if rank == 0 else torch.tensor([20, 30])
        gathered = {"rows": gather_rows(rows), "ints": gather_rows(ints)}
        gathered["rows_in_pieces"] = gather_rows(rows, chunk_bytes=16)  # one row of 2 float64 per collective
        torch.save(gathered, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_rows_concatenates_in_rank_order_with_uneven_and_empty_blocks(tmp_path):
    out = str(tmp_path / "gathered")
    mp.spawn(_gather_on_two, args=(f"file://{tmp_path / 'init'}", out), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["rows"].dtype == torch.float64
        assert torch.equal(got["rows"], torch.arange(6, dtype=torch.float64).reshape(3, 2))
        assert torch.equal(got["rows_in_pieces"], got["rows"])
        assert got["ints"].tolist() == [10, 20, 30]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """7 + 1 broken training images over two classes (odd: the processes' blocks differ in length), 5 test
    images, and a tiny ViT's weights."""
    root = tmp_path_factory.mktemp("shardeval")
    for split, dest, per_class in (("train", "train", 4), ("val", "test", 3)):
        for name in ("airplane", "bird"):
            (root / dest / name).mkdir(parents=True)
            for image in sorted((sample_dataset(split) / name).iterdir())[:per_class]:
                shutil.copy(image, root / dest / name / image.name)
    (root / "train" / "bird" / sorted((root / "train" / "bird").iterdir())[0].name).unlink()
    (root / "train" / "bird" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "test" / "bird" / sorted((root / "test" / "bird").iterdir())[0].name).unlink()
    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    torch.save(model.state_dict(), root / "backbone.pth")
    return {"train": root / "train", "test": root / "test", "weights": root / "backbone.pth"}


def _dino(args: list, processes: int, tmp_path: Path) -> subprocess.CompletedProcess:
    launcher = ["-m", "dino.cli"]
    if processes > 1:  # --standalone: a free port of its own, whatever else runs on the machine
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *launcher, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_extract_the_same_features_file_as_one(folders, tmp_path):
    """Row for row: same paths, labels and features, the broken file missing once, nothing repeated."""
    common = ["extract", folders["train"], "--weights", folders["weights"], *CPU]
    one = _dino([*common, "--out", tmp_path / "one.pt"], 1, tmp_path)
    two = _dino([*common, "--out", tmp_path / "two.pt", "--output", tmp_path / "two.json"], 2, tmp_path)
    a, b = FeatureSet.load(tmp_path / "one.pt"), FeatureSet.load(tmp_path / "two.pt")
    assert len(a) == 7 and not any(p.endswith("broken.jpg") for p in a.paths)
    assert b.paths == a.paths and b.classes == a.classes and torch.equal(b.labels, a.labels)
    assert set(b.features) == set(a.features)
    for name in a.features:
        assert torch.allclose(b.features[name], a.features[name], atol=1e-5), name
    assert json.loads((tmp_path / "two.json").read_text())["images"] == 7
    assert one.stdout.count("## features of") == 1 and two.stdout.count("## features of") == 1  # rank 0 alone


@pytest.mark.slow
def test_knn_under_torchrun_gives_the_single_process_numbers(folders, tmp_path):
    common = ["knn", "--train", folders["train"], "--test", folders["test"], "--weights", folders["weights"]]
    common += ["--ks", 1, 3, *CPU]
    _dino([*common, "--output", tmp_path / "one.json"], 1, tmp_path)
    _dino([*common, "--output", tmp_path / "two.json"], 2, tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("k=1", "k=3", "train_images", "test_images", "classes"):
        assert one[key] == two[key], key
    assert two["train_images"] == 7 and two["test_images"] == 5


def test_a_single_process_command_refuses_torchrun(monkeypatch, tmp_path, capsys):
    from dino.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["attention", str(tmp_path), "--random-init", "--arch", "vit_tiny", "--device", "cpu"])
    assert code == 2
    assert "runs in one process" in capsys.readouterr().err


def _embed_everything(folders: dict[str, Path]) -> dict[str, object]:
    """The k-NN monitor's accuracy, retrieval's global descriptors and copy detection's descriptors of the
    same images, in this process (split when a process group is up)."""
    from dino.eval.copy_detection import descriptors
    from dino.eval.retrieval import RetrievalImages, global_features
    from dino.train.monitors import OnlineKNN

    torch.manual_seed(0)
    model, _ = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    model.eval()
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    knn = OnlineKNN(folders["train"], folders["test"], 32, 36, mean, std, k=3, batch_size=3)
    paths = sorted(p for p in Path(folders["test"]).rglob("*.jpg"))  # 5 images
    cpu = torch.device("cpu")
    return {
        "knn": knn.evaluate(model, cpu, None),
        "retrieval": global_features(model, RetrievalImages(paths, 32), cpu, batch_size=2),
        "copy": descriptors(model, paths, cpu, imsize=32, batch_size=2),
    }


def _embed_on_two(rank: int, init: str, folders: dict[str, Path], out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.save(_embed_everything(folders), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_knn_monitor_retrieval_and_copy_detection_split_across_two_processes(folders, tmp_path):
    """Every process gets all the rows, in order: the numbers of one process, in each."""
    single = _embed_everything(folders)
    out = str(tmp_path / "embedded")
    mp.spawn(_embed_on_two, args=(f"file://{tmp_path / 'init'}", folders, out), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["knn"] == pytest.approx(single["knn"])
        for key in ("retrieval", "copy"):
            assert got[key].shape == single[key].shape == (5, got[key].shape[1])
            assert torch.allclose(got[key], single[key], atol=1e-5), key
