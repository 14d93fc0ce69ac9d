"""Crash-safe checkpoints: atomic writes, a rolling window of the latest, periodic keepers, safe loading.

A checkpoint holds only tensors and plain containers (the config as plain data), so it loads with
``torch.load(weights_only=True)``. Files are written to a temporary name, flushed to disk and renamed, so a
kill at any moment leaves every previous checkpoint readable; on resume, an unreadable newest file is
reported and the previous good one is used.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dino-checkpoint"
_ROLLING = re.compile(r"^last-(\d{9,})\.pth$")  # zero-padded to 9 digits, more past 999,999,999
_KEEPER = re.compile(r"^epoch-(\d{4,})\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not contain what is needed."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` such that readers see either the old file or the complete new one."""
    _write_atomically(path, lambda fh: torch.save(obj, fh))


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write`` into a temporary file beside ``path``, on disk before it takes the name; nothing is left
    behind if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (no code is executed); raise CheckpointError if unreadable."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dino training checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return obj


class CheckpointManager:
    """Owns ``<run>/checkpoints``: ``last-<iteration>.pth`` (rolling, ``keep_last`` kept) and
    ``epoch-<epoch>.pth`` (periodic, kept)."""

    def __init__(self, run_dir: Path, keep_last: int = 2) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def remove_stale_temporaries(self) -> None:
        """Partial files left by a process killed while writing (never read, safe to delete)."""
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.tmp-*"):
                leftover.unlink(missing_ok=True)

    def _numbered(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        """(number, path) of the files whose name matches ``pattern``, in increasing order."""
        if not self.directory.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.directory.iterdir() if (m := pattern.match(p.name)))

    def rolling(self) -> list[Path]:
        """Rolling checkpoints, newest first."""
        return [p for _, p in reversed(self._numbered(_ROLLING))]

    def save(self, state: dict[str, Any], iteration: int, epoch_keeper: int | None = None) -> Path:
        state = {"format": CHECKPOINT_FORMAT, **state}
        path = self.directory / f"last-{iteration:09d}.pth"
        atomic_save(state, path)
        if epoch_keeper is not None:
            keeper = self.directory / f"epoch-{epoch_keeper:04d}.pth"
            tmp = _temporary(keeper)
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)  # same bytes without a second write (already on disk)
            except OSError:  # no hard links here: a copy
                with open(path, "rb") as src:
                    _write_atomically(keeper, lambda dst: shutil.copyfileobj(src, dst))
            else:
                os.replace(tmp, keeper)
                _fsync_dir(keeper.parent)
        for old in self.rolling()[self.keep_last :]:
            old.unlink(missing_ok=True)
        return path

    def newer_than(self, iteration: int, epoch: int) -> list[Path]:
        """Checkpoints of a later point than (``iteration``, ``epoch``): what a run continued from an
        earlier checkpoint would otherwise mistake for its own (its rolling window keeps the highest
        iterations, and resuming picks the newest)."""
        return [p for i, p in self._numbered(_ROLLING) if i > iteration] + [
            p for e, p in self._numbered(_KEEPER) if e > epoch
        ]

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """Newest readable rolling checkpoint; unreadable ones are reported and passed over."""
        for path in self.rolling():
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as err:
                log.warning("%s; falling back to the previous checkpoint", err)
        return None


def set_aside(run_dir: Path, names: Iterable[str | Path]) -> Path | None:
    """Move ``names`` (relative to ``run_dir``; missing ones are passed over) into a new
    ``run_dir/replaced-<UTC time>/``, keeping their relative paths; returns that folder, or None when
    nothing was there. Nothing is deleted: a run that starts afresh, or continues from an earlier point,
    must neither overwrite nor mix with the files of the run it replaces."""
    run_dir = Path(run_dir)
    present = [Path(n) for n in names if (run_dir / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = run_dir / f"replaced-{stamp}", 1
    while target.exists():
        n += 1
        target = run_dir / f"replaced-{stamp}-{n}"
    for name in present:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / name, target / name)
    _fsync_dir(run_dir)
    return target
