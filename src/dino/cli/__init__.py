"""``dino <command>``: training, evaluation and export from the command line.

Each module of this package holds one family of commands and exposes ``register(subparsers)``, which adds
each of its commands with ``subparsers.add_parser(name, …)`` and sets ``func`` to the function that runs it,
``run_<command>(args) -> int`` (the exit status). :func:`main` parses the command line, runs ``func`` and
turns the errors a user can fix into one line. Options several commands share live in
:mod:`dino.cli.arguments`, the results table in :mod:`dino.cli.output`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO

from dino.checkpoint import CheckpointError
from dino.cli import data, dense, evaluate, export, finetune, plot, slurm, study, train
from dino.cli.processes import command_processes
from dino.config import ConfigError
from dino.data.datasets import ImageDecodeError, SkippedImageWarning
from dino.data.in_memory import InMemoryTooLarge
from dino.train.guard import TrainingDiverged

# The command families, in the order ``dino --help`` lists them; a new family adds its module here.
COMMAND_FAMILIES = (train, data, evaluate, export, dense, finetune, study, plot, slurm)


def build_parser() -> argparse.ArgumentParser:
    """The ``dino`` parser with every command of :data:`COMMAND_FAMILIES`."""
    parser = argparse.ArgumentParser(prog="dino", description="DINO: self-distillation with no labels")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in COMMAND_FAMILIES:
        family.register(sub)
    for command in sub.choices.values():  # -v after the command too (dino train -v)
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``dino train``'s ``key=value`` overrides accepted before and after options
    alike (argparse alone takes one run of positionals: ``a=1 --output x b=2`` would refuse ``b=2``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)
        if not overrides:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


# What a command may fail with for a reason its message explains (a bad option, file, checkpoint or disk;
# a run that diverged): one line, not a traceback, unless -v asks for it. ValueError covers the project's
# ConfigError, WeightsError and DatasetError; OSError the file-system errors.
_REPORTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    CheckpointError,
    TrainingDiverged,
    InMemoryTooLarge,
    ImageDecodeError,
)


class _OneLineSkips:
    """``warnings.showwarning`` that logs a skipped file as one line (the warning's message says which file
    and why; its source location is ours, of no use to the user) and passes every other warning on."""

    def __init__(self, fallback: Callable[..., None]) -> None:
        self.fallback = fallback

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if file is None and issubclass(category, SkippedImageWarning):
            logging.getLogger("dino.data").warning("%s", message)
        else:
            self.fallback(message, category, filename, lineno, file, line)


def _capture_warnings() -> None:
    logging.captureWarnings(True)
    if not isinstance(warnings.showwarning, _OneLineSkips):
        warnings.showwarning = _OneLineSkips(warnings.showwarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _capture_warnings()
    try:
        with command_processes(args):
            return int(args.func(args) or 0)
    except _REPORTED_ERRORS as err:
        if args.verbose:
            traceback.print_exc()
        kind = "configuration error" if isinstance(err, ConfigError) else "error"
        print(f"dino: {kind}: {err}", file=sys.stderr)
        # 2 for what the user asked (options, paths, settings), as argparse does; 1 for what failed on the way.
        return 2 if isinstance(err, ValueError | FileNotFoundError) else 1
    except KeyboardInterrupt:  # before training's own handler is installed (setup, scanning, decoding)
        if args.verbose:
            traceback.print_exc()
        print("dino: interrupted", file=sys.stderr)
        return 130
