"""``dino <command>``: train, and list presets. Evaluation and export commands register here too."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TextIO

from dino.data.datasets import ImageDecodeError, SkippedImageWarning
from dino.data.in_memory import InMemoryTooLarge
from dino.eval.commands import register_extract, register_knn, register_linear, register_lowshot
from dino.eval.dense_commands import (
    register_attention,
    register_copydetect,
    register_retrieval,
    register_videoseg,
)
from dino.export import register as _add_export
from dino.hub import released_checkpoint_config
from dino.output_paths import OutputPathError, writable_folder
from dino.train.checkpoint import CheckpointError
from dino.train.config import ConfigError, load_config, preset_names
from dino.train.curves import knn_summary
from dino.train.guard import TrainingDiverged

Command = Callable[[argparse.Namespace], int]


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="self-supervised DINO training on a folder of images",
        description="Train DINO. Settings come from the defaults (the paper's ViT-S/16 recipe), a preset or YAML "
        "file (--config), and dotted overrides such as run.epochs=10 optim.lr=1e-3.",
    )
    p.add_argument("--config", help=f"preset name ({', '.join(preset_names())}) or YAML file")
    p.add_argument(
        "--data", help="image folder (class sub-folders optional); default: the bundled CIFAR-10 sample"
    )
    p.add_argument("--output", type=writable_folder, help="run directory (default: run.output_dir)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="PATH", help="continue from this checkpoint or run directory")
    group.add_argument(
        "--no-resume", action="store_true", help="start afresh even if the run directory has a checkpoint"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.output:
        overrides.append(f"run.output_dir={args.output}")
    base = None
    if args.resume:
        # The original's full checkpoint names its architecture, head and recipe in its args: no need to
        # restate them (our checkpoints' run directories keep theirs in config.yaml).
        base = released_checkpoint_config(args.resume)
        if base is not None:
            logging.getLogger("dino.cli").info(
                "%s: architecture, head and recipe from its args (the command line may change the recipe)",
                args.resume,
            )
    cfg = load_config(args.config, overrides, base)
    try:  # also when the run directory comes from the config, before any data is read
        writable_folder(cfg.run.output_dir)
    except OutputPathError as err:
        raise ConfigError(f"run.output_dir: {err}") from err
    from dino.train.loop import train

    resume = args.resume if args.resume else not args.no_resume
    run_dir = train(cfg, resume=resume)
    print(f"run directory: {run_dir}")
    summary = knn_summary(run_dir)
    if summary is not None:
        print(summary)
    return 0


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the bundled configuration presets")
    p.set_defaults(func=lambda args: print("\n".join(preset_names())) or 0)


# Each command module exposes ``register(subparsers)``; add new commands to this tuple.
_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train,
    _add_presets,
    register_extract,
    register_knn,
    register_linear,
    register_lowshot,
    _add_export,
    register_videoseg,
    register_attention,
    register_retrieval,
    register_copydetect,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dino", description="DINO: self-distillation with no labels")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
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


if __name__ == "__main__":
    sys.exit(main())
