"""Crash-safe checkpoints: atomic writes, a rolling window of the latest, periodic keepers, safe loading.

A checkpoint holds only tensors and plain containers (the config as plain data), so it loads with
``torch.load(weights_only=True)``. Files are written to a temporary name, flushed to disk and renamed, so a
kill at any moment leaves every previous checkpoint readable; on resume, an unreadable newest file is
reported and the previous good one is used (the rolling ones first, then the kept ``epoch-N.pth``). A write
that does not fit on the disk stops with one error saying so; the previous checkpoint stays the newest.

A sharded run (``run.strategy=fsdp``) writes ``torch.distributed.checkpoint`` directories instead
(``last-<iteration>.dcp/``: every process's shards, DCP's ``.metadata`` and ``extra.pth`` with the plain
data), first under a temporary name, renamed once complete; they are found, passed over when unreadable and
rolled like the files, and :func:`load_checkpoint` reads them consolidated, so readers need not know.

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
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dino-checkpoint"
# Zero-padded to 9 digits, more past 999,999,999; .pth: a file, .dcp: a sharded checkpoint's directory.
_ROLLING = re.compile(r"^last-(\d{9,})\.(?:pth|dcp)$")
_KEEPER = re.compile(r"^epoch-(\d{4,})\.(?:pth|dcp)$")
SHARDED_SUFFIX = ".dcp"
SHARDED_EXTRA = "extra.pth"  # a sharded checkpoint's plain data (epoch, config, center, random streams…)
_DCP_METADATA = ".metadata"  # written last by torch.distributed.checkpoint's file system writer


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
    write_atomically(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path`` such that readers see either the old file or the complete new one."""
    write_atomically(path, lambda fh: fh.write(text.encode()))


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
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


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, consolidate: bool = True
) -> dict[str, Any]:
    """Load one of our checkpoints safely (no code is executed); raise CheckpointError if unreadable. A
    sharded one (a directory) is read whole, or with ``consolidate=False`` checked and described only
    (see :func:`load_sharded_checkpoint`)."""
    if Path(path).is_dir():
        return load_sharded_checkpoint(Path(path), map_location, consolidate=consolidate)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dino training checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return obj


def is_sharded_checkpoint(path: str | Path) -> bool:
    """``path`` is a sharded checkpoint's directory (``torch.distributed.checkpoint`` with our data)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_EXTRA).is_file()


def load_sharded_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, consolidate: bool = True
) -> dict[str, Any]:
    """A sharded checkpoint directory in the layout of our other checkpoints: its plain data, ``student``
    and ``teacher`` (``backbone.*`` / ``head.*``) and ``optimizer_by_name`` (the optimiser's per-parameter
    state keyed by parameter name), plus ``sharded_path``. ``consolidate``: the full tensors, read in this
    process alone (no process group needed: export, evaluation, a run on one process); otherwise the
    shards' files are checked to be all there and complete, and the tensors are shape-only (``meta``) for a
    sharded run to read its own slices with :func:`dino.train.sharding.load_into_sharded`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    extra = load_checkpoint(path / SHARDED_EXTRA, map_location)
    try:
        reader = dcp.FileSystemReader(str(path))
        metadata = reader.read_metadata()
        tensors = {
            key: meta
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }
        _check_shard_files(path, metadata)
        device = map_location if consolidate else "meta"
        flat = {
            key: torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
            for key, meta in tensors.items()
        }
        if consolidate:
            with warnings.catch_warnings():  # that no process group is used is the point here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(flat, storage_reader=reader, no_dist=True)
    except CheckpointError:
        raise
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read sharded checkpoint {path} ({type(err).__name__}: {detail})"
        ) from err
    # DCP stores nested dicts under dotted keys and keeps each key's path: rebuild the nesting.
    paths = metadata.planner_data or {}
    nested: dict[str, Any] = {"student": {}, "teacher": {}, "optimizer_by_name": {}}
    for key, tensor in flat.items():
        parts = paths.get(key, tuple(key.split(".", 1)))
        if parts[0] in ("student", "teacher") and len(parts) == 2:
            nested[parts[0]][parts[1]] = tensor
        elif parts[:2] == ("optimizer", "state") and len(parts) == 4:
            nested["optimizer_by_name"].setdefault(parts[2], {})[parts[3]] = tensor
    return {**extra, **nested, "sharded_path": str(path)}


def _check_shard_files(path: Path, metadata: Any) -> None:
    """Every file the metadata names exists and holds the bytes it points to (a truncated or missing shard
    is found here, where the fallback to an older checkpoint can still take over)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in needed.items():
        file = path / name
        if not file.is_file() or file.stat().st_size < size:
            raise CheckpointError(f"sharded checkpoint {path} is incomplete: {name} is missing or truncated")


class CheckpointManager:
    """Owns ``<run>/checkpoints``: ``last-<iteration>.pth`` (rolling, ``keep_last`` kept) and
    ``epoch-<epoch>.pth`` (periodic, kept)."""

    def __init__(self, run_dir: Path, keep_last: int = 2) -> None:
        self.directory = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def remove_stale_temporaries(self) -> None:
        """Partial files (and sharded directories) left by a process killed while writing (never read,
        safe to delete)."""
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.tmp-*"):
                _remove(leftover)

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
        self._drop_old_rolling()
        return path

    def _drop_old_rolling(self) -> None:
        for old in self.rolling()[self.keep_last :]:
            _remove(old)

    def save_sharded(
        self,
        shards: dict[str, Any],
        extra: dict[str, Any] | None,
        iteration: int,
        epoch_keeper: int | None = None,
    ) -> Path:
        """Write ``last-<iteration>.dcp/`` (and ``epoch-<epoch_keeper>.dcp/``) from every process (a
        collective): ``shards`` (each process's state dicts of sharded tensors) with
        ``torch.distributed.checkpoint``, ``extra`` (the plain data, given on the first process only, None
        elsewhere) as ``extra.pth``; in a single process (no process group) it is written alone. All of it
        goes into a temporary directory first, renamed once every process has written its part: a kill at
        any moment leaves the previous checkpoints as they were. A failure raises on every process."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        main = extra is not None  # the first process (rank 0)
        together = dist.is_available() and dist.is_initialized()
        path = self.directory / f"last-{iteration:09d}{SHARDED_SUFFIX}"
        tmp = path.with_name(f".{path.name}.tmp-sharded")  # one name for all processes (not a pid)
        if main:
            _remove(tmp)
            tmp.mkdir(parents=True)
        if together:
            dist.barrier()
        with warnings.catch_warnings():  # a single process: writing without a process group is meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # Raises on every process if one failed to write.
            dcp.save(shards, checkpoint_id=str(tmp), no_dist=not together)
        error: BaseException | None = None
        if extra is not None:  # main
            try:
                atomic_save({"format": CHECKPOINT_FORMAT, **extra}, tmp / SHARDED_EXTRA)
                _replace_directory(tmp, path)
                if epoch_keeper is not None:
                    self._keep_directory(path, self.directory / f"epoch-{epoch_keeper:04d}{SHARDED_SUFFIX}")
                self._drop_old_rolling()
            except OSError as err:
                _remove(tmp)
                full = err.errno in _NO_SPACE
                error = DiskFullError(self._disk_full_message(path, _tensor_bytes(shards))) if full else err
        # The first process tells the others how it went (they would otherwise wait for it in vain).
        failed = [error is not None]
        if together:
            dist.broadcast_object_list(failed, src=0)
        if error is not None:
            raise error
        if failed[0]:
            raise CheckpointError(f"the first process could not complete {path}: see its error above")
        return path

    def _keep_directory(self, path: Path, keeper: Path) -> None:
        """A kept copy of the sharded checkpoint ``path``: hard links to its files (copies where the file
        system has none), under a temporary name first."""
        tmp = keeper.with_name(f".{keeper.name}.tmp-sharded")
        _remove(tmp)
        shutil.copytree(path, tmp, copy_function=_link_or_copy)
        _replace_directory(tmp, keeper)

    def _keep(self, path: Path, keeper: Path) -> None:
        tmp = _temporary(keeper)
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # same bytes without a second write (already on disk)
        except OSError:  # no hard links here: a copy
            with open(path, "rb") as src:
                write_atomically(keeper, lambda dst: shutil.copyfileobj(src, dst))
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

    def load_latest(
        self, map_location: str | torch.device = "cpu", *, consolidate: bool = True
    ) -> tuple[dict[str, Any], Path] | None:
        """Newest readable checkpoint: the rolling ones newest first, then the kept ``epoch-N.pth`` ones
        newest first; unreadable ones are reported and passed over (``consolidate``: see
        :func:`load_sharded_checkpoint`). None when there is no checkpoint;
        CheckpointError when there are some and none can be read (a silent fresh start would throw the
        run away)."""
        candidates = self.rolling() + self.keepers()
        for path in candidates:
            try:
                return load_checkpoint(path, map_location, consolidate=consolidate), path
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


def _remove(path: Path) -> None:
    """A checkpoint file or a sharded checkpoint's directory, gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_directory(tmp: Path, path: Path) -> None:
    """Give the complete directory ``tmp`` the name ``path``, on disk. A directory of that name already
    there (the same iteration saved again) is moved aside first and removed after."""
    _fsync_dir(tmp)  # the files' contents were synced by their writers (DCP's sync_files, atomic_save)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.tmp-replaced")
        _remove(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        _remove(old)


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
