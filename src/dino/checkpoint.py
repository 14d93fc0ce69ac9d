"""Crash-safe checkpoints: atomic writes, a rolling window of the latest, periodic keepers, safe loading.

A checkpoint holds only tensors and plain containers (the config as plain data), so it loads with
``torch.load(weights_only=True)``. Files are written to a temporary name, flushed to disk and renamed, so a
kill at any moment leaves every previous checkpoint readable; on resume, an unreadable newest file is
reported and the previous good one is used (the rolling ones first, then the kept ``epoch-N.pth``). A write
that does not fit on the disk stops with one error saying so; the previous checkpoint stays the newest.

Training writes these files; :mod:`dino.hub` reads them (and writes its exports with :func:`atomic_save`),
so this module sits below both.
"""

from __future__ import annotations

import errno
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
    """A checkpoint cannot be read or written, or does not contain what is needed."""


class DiskFullError(CheckpointError):
    """A checkpoint did not fit on the disk; the checkpoints saved before it are untouched."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What torch's zip writer raises when a write came up short: given a file object it chains the OSError
# (ENOSPC) under "unexpected pos"; given a path, its C++ stream keeps no errno ("iostream error").
_SHORT_WRITE = ("unexpected pos", "iostream error")


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

    def keepers(self) -> list[Path]:
        """Periodic ``epoch-N.pth`` checkpoints, newest first."""
        return [p for _, p in reversed(self._numbered(_KEEPER))]

    def save(self, state: dict[str, Any], iteration: int, epoch_keeper: int | None = None) -> Path:
        """Write ``last-<iteration>.pth`` (and ``epoch-<epoch_keeper>.pth``); raise DiskFullError, with the
        free space and the size needed, when it does not fit."""
        state = {"format": CHECKPOINT_FORMAT, **state}
        path = target = self.directory / f"last-{iteration:09d}.pth"
        try:
            atomic_save(state, path)
            if epoch_keeper is not None:
                target = self.directory / f"epoch-{epoch_keeper:04d}.pth"
                self._keep(path, target)
        except (OSError, RuntimeError) as err:
            needed = _tensor_bytes(state)
            if not _out_of_space(err, self.directory, needed):
                raise
            # The cause is known and named below: torch's two chained tracebacks would only bury it.
            raise DiskFullError(self._disk_full_message(target, needed)) from None
        for old in self.rolling()[self.keep_last :]:
            old.unlink(missing_ok=True)
        return path

    def _keep(self, path: Path, keeper: Path) -> None:
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

    def _disk_full_message(self, path: Path, needed: int) -> str:
        run_dir = self.directory.parent
        try:
            free = _size(shutil.disk_usage(self.directory).free)
        except OSError:
            free = "an unknown amount"
        newest = self.rolling()
        then = (
            f"it continues from {newest[0]}, the newest checkpoint, which is intact"
            if newest
            else "no checkpoint of this run was saved yet, so it starts afresh"
        )
        return (
            f"no space left on the disk of {run_dir} to save {path.name} (about {_size(needed)} needed, "
            f"{free} free): free some space there and run the same command again; {then}"
        )

    def newer_than(self, iteration: int, epoch: int) -> list[Path]:
        """Checkpoints of a later point than (``iteration``, ``epoch``): what a run continued from an
        earlier checkpoint would otherwise mistake for its own (its rolling window keeps the highest
        iterations, and resuming picks the newest)."""
        return [p for i, p in self._numbered(_ROLLING) if i > iteration] + [
            p for e, p in self._numbered(_KEEPER) if e > epoch
        ]

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """Newest readable checkpoint: the rolling ones newest first, then the kept ``epoch-N.pth`` ones
        newest first; unreadable ones are reported and passed over. None when there is no checkpoint;
        CheckpointError when there are some and none can be read (a silent fresh start would throw the
        run away)."""
        candidates = self.rolling() + self.keepers()
        for path in candidates:
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as err:
                log.warning("%s; falling back to the previous checkpoint", err)
        if candidates:
            names = ", ".join(p.name for p in candidates)
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} can be read ({names}): continue from another "
                "file with --resume PATH, or start afresh with --no-resume, which moves them into "
                "replaced-<time>/ without deleting them"
            )
        return None


def _out_of_space(err: BaseException, directory: Path, needed: int) -> bool:
    """``err`` (from writing ``needed`` bytes into ``directory``) means the disk or quota is full."""
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    if any(isinstance(e, OSError) and e.errno in _NO_SPACE for e in chain):
        return True
    if not any(isinstance(e, RuntimeError) and any(s in str(e) for s in _SHORT_WRITE) for e in chain):
        return False
    try:  # a short write without errno: full if the checkpoint still does not fit (its temporary is gone)
        return shutil.disk_usage(directory).free < needed
    except OSError:
        return False


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


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
