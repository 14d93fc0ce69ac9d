import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import dino.checkpoint as checkpoint_module
from dino.checkpoint import (
    CheckpointError,
    CheckpointManager,
    DiskFullError,
    atomic_save,
    load_checkpoint,
)


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
    import dino.checkpoint as checkpoint

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


def tear(path: Path) -> None:
    """What a crash leaves where renames are not atomic: the name on a new, partly written file (an
    epoch keeper, a hard link of the old one, keeps the old bytes)."""
    head = path.read_bytes()[:100]
    path.unlink()
    path.write_bytes(head)


def test_unreadable_rolling_checkpoints_fall_back_to_the_kept_epoch_ones(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it, keeper in ((10, 1), (20, 2), (30, None)):
        manager.save({"iteration": it}, it, epoch_keeper=keeper)
    for path in manager.rolling():
        tear(path)
    state, path = manager.load_latest()
    assert state["iteration"] == 20 and path.name == "epoch-0002.pth"  # the newest kept one
    assert caplog.text.count("falling back") == 2


def test_no_readable_checkpoint_is_an_error_naming_the_files_not_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20):
        manager.save({"iteration": it}, it, epoch_keeper=it // 10)
    for path in manager.rolling() + manager.keepers():
        tear(path)
    with pytest.raises(CheckpointError) as caught:
        manager.load_latest()
    message = str(caught.value)
    for name in ("last-000000020.pth", "last-000000010.pth", "epoch-0002.pth", "epoch-0001.pth"):
        assert name in message
    assert "--no-resume" in message
    assert CheckpointManager(tmp_path / "fresh").load_latest() is None  # no checkpoint at all: a fresh start


_Usage = namedtuple("_Usage", "total used free")
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _full_disk_writer(with_errno: bool):
    """torch.save as it fails on a full disk: given a file object, the OSError (ENOSPC) under torch's
    "unexpected pos" RuntimeError (what a 1 MiB tmpfs gives with torch 2.14); given a path, no errno."""

    def save(obj, fh):
        fh.write(b"PK partial")
        if not with_errno:
            raise RuntimeError(TORCH_SHORT_WRITE)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(TORCH_SHORT_WRITE)  # noqa: B904 (torch chains it implicitly)

    return save


@pytest.mark.parametrize("with_errno", [True, False])
def test_a_full_disk_stops_with_the_space_needed_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, with_errno
):
    manager = CheckpointManager(tmp_path / "run", keep_last=1)
    manager.save({"iteration": 1, "w": torch.ones(4)}, 1)
    monkeypatch.setattr(torch, "save", _full_disk_writer(with_errno))
    # Without errno, the free space decides: 1 KiB left for 64 MiB of tensors.
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: _Usage(2**30, 2**30 - 1024, 1024))
    with pytest.raises(DiskFullError) as caught:
        manager.save({"iteration": 2, "w": torch.zeros(2**24)}, 2)
    message = str(caught.value)
    assert str(tmp_path / "run") in message and "last-000000002.pth" in message
    assert "64.0 MiB needed" in message and "0.0 MiB free" in message
    assert "last-000000001.pth" in message  # where the same command will continue from
    monkeypatch.undo()
    assert [p.name for p in manager.rolling()] == ["last-000000001.pth"]
    assert manager.load_latest()[0]["iteration"] == 1
    assert not list(manager.directory.glob(".*.tmp-*"))


def test_a_short_write_with_room_left_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=1)
    monkeypatch.setattr(torch, "save", _full_disk_writer(with_errno=False))
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda _: _Usage(2**40, 0, 2**40))
    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        manager.save({"iteration": 1, "w": torch.zeros(8)}, 1)
    assert not isinstance(caught.value, DiskFullError)


_ON_TINY_TMPFS = textwrap.dedent(
    """
    import subprocess, sys, tempfile, torch
    from pathlib import Path
    from dino.checkpoint import CheckpointManager, DiskFullError
    root = Path(tempfile.mkdtemp())
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    manager = CheckpointManager(root / "run", keep_last=2)
    manager.save({"w": torch.ones(2**16)}, 1)  # 256 KiB: fits
    try:
        manager.save({"w": torch.zeros(2**20)}, 2)  # 4 MiB: does not
    except DiskFullError as err:
        print(err)
    print([p.name for p in manager.directory.iterdir()])
    print(torch.load(manager.rolling()[0], weights_only=True)["w"].sum().item())
    """
)


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux) to mount a tmpfs")
def test_a_full_tmpfs_stops_with_one_clear_error(tmp_path):
    """A real full disk: a 1 MiB tmpfs, mounted in a user namespace of a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = subprocess.run(["unshare", "-Urm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        ["unshare", "-Urm", sys.executable, "-c", _ON_TINY_TMPFS], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    message, names, total = done.stdout.splitlines()
    assert message.startswith("no space left on the disk of ") and "4.0 MiB needed" in message
    assert names == "['last-000000001.pth']" and float(total) == 2**16  # the previous one, intact
