"""Where ``dino`` commands write, checked before any work: a results file that is a folder, a folder that is
a file, or a path under a file would otherwise fail only at the end, after the model has run.

Each check returns the path it was given (so it serves as an ``argparse`` ``type=``) or raises
:class:`OutputPathError`, which argparse reports as a bad argument and ``dino`` as a one-line error.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class OutputPathError(ValueError, argparse.ArgumentTypeError):
    """An output path that cannot be written as asked; the message says why and what to do."""


def writable_file(value: str) -> str:
    """A file to write (replaced if it exists): not an existing folder, not under a file."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{value} is a folder; give the name of a file to write")
    _check_parents(path, value)
    return value


def writable_folder(value: str) -> str:
    """A folder to write into (created if missing): not an existing file, not under a file."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{value} is an existing file; give a folder (new or existing) instead")
    _check_parents(path, value)
    return value


def writable_file_or_folder(value: str) -> str:
    """A file to write, or an existing folder to write into: only a path under a file is refused."""
    _check_parents(Path(value).expanduser(), value)
    return value


def _check_parents(path: Path, value: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{value} lies under {parent}, which is a file; choose another path")
            return
