"""``dino train`` and ``dino presets``: self-supervised training from a config, a preset or YAML file and
dotted overrides (:mod:`dino.config`), run by :func:`dino.train.loop.train`."""

from __future__ import annotations

import argparse
import logging

from dino.config import ConfigError, DINOConfig, load_config, preset_names
from dino.hub import released_checkpoint_config
from dino.output_paths import OutputPathError, writable_folder
from dino.train import loop as training_loop  # looked up at each call: replacing loop.train takes effect
from dino.train.curves import knn_summary

log = logging.getLogger("dino.cli")  # the package's logger: log records keep the name they always had


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino train`` and ``dino presets``."""
    _add_train(sub)
    _add_presets(sub)


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
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    cfg, resume = train_config(args)
    run_dir = training_loop.train(cfg, resume=resume)
    print(f"run directory: {run_dir}")
    summary = knn_summary(run_dir)
    if summary is not None:
        print(summary)
    return 0


def train_config(args: argparse.Namespace) -> tuple[DINOConfig, str | bool]:
    """The validated configuration of a ``dino train`` command line and what it resumes from (a path, or
    whether to continue the run directory's own run); refuses an output folder it cannot write to."""
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
            log.info(
                "%s: architecture, head and recipe from its args (the command line may change the recipe)",
                args.resume,
            )
    cfg = load_config(args.config, overrides, base)
    try:  # also when the run directory comes from the config, before any data is read
        writable_folder(cfg.run.output_dir)
    except OutputPathError as err:
        raise ConfigError(f"run.output_dir: {err}") from err
    resume: str | bool = args.resume if args.resume else not args.no_resume
    return cfg, resume


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the bundled configuration presets")
    p.set_defaults(func=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0
