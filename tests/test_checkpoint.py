import os

import pytest
import torch

from dino.train.checkpoint import CheckpointError, CheckpointManager, atomic_save, load_checkpoint


def test_atomic_save_replaces_whole_file(tmp_path):
    path = tmp_path / "x.pth"
    atomic_save({"a": torch.ones(3)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]  # no temporary left behind


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "x.pth"
    atomic_save({"a": torch.ones(3)}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert len(os.listdir(tmp_path)) == 1


def test_rolling_window_keepers_and_fallback(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20, 30):
        manager.save(
            {"iteration": it, "w": torch.full((2,), float(it))}, it, epoch_keeper=1 if it == 10 else None
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-0001.pth", "last-000000020.pth", "last-000000030.pth"]
    assert load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pth")["iteration"] == 10
    # Corrupt the newest: resume falls back to the previous good one and says so.
    newest = tmp_path / "checkpoints" / "last-000000030.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    state, path = manager.load_latest()
    assert state["iteration"] == 20 and path.name == "last-000000020.pth"
    assert "falling back" in caplog.text


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="not a dino training checkpoint"):
        load_checkpoint(path)


def test_iterations_past_nine_digits_stay_in_the_rolling_window(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (999_999_998, 999_999_999, 1_000_000_000, 1_000_000_001):
        manager.save({"iteration": it}, it)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last-1000000000.pth", "last-1000000001.pth"]
    assert manager.load_latest()[0]["iteration"] == 1_000_000_001


def test_an_epoch_keeper_copied_without_hard_links_is_complete_or_absent(tmp_path, monkeypatch):
    import dino.train.checkpoint as checkpoint

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save({"iteration": 5, "w": torch.arange(4.0)}, 5, epoch_keeper=0)
    kept = load_checkpoint(tmp_path / "checkpoints" / "epoch-0000.pth")
    assert kept["iteration"] == 5 and torch.equal(kept["w"], torch.arange(4.0))

    def disk_full(src, dst, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space"):
        manager.save({"iteration": 6}, 6, epoch_keeper=1)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers == [] and not (tmp_path / "checkpoints" / "epoch-0001.pth").exists()
