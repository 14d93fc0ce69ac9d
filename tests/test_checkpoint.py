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
