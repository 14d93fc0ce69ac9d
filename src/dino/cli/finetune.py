"""``dino finetune``: the whole network (a DINO backbone and a new linear head) trained on labelled images
with DeiT's recipe (:mod:`dino.finetune`), then evaluated on held-out images."""

from __future__ import annotations

import argparse
import json

from dino.config import ConfigError
from dino.finetune.config import finetune_preset_names, load_finetune_config
from dino.finetune.trainer import finetune
from dino.output_paths import OutputPathError, writable_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino finetune``."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a backbone with a new linear head on labelled images (DeiT's recipe)",
        description="Fine-tune the whole network: the backbone --weights names (a run, checkpoint, export or "
        "released name) and a new linear classifier, with DeiT's recipe (RandAugment, random erasing, "
        "Mixup/CutMix, label smoothing, stochastic depth, AdamW with warm-up and cosine). Settings come from "
        "the defaults, a preset or YAML file (--config) and dotted overrides such as run.epochs=10 "
        "optim.layer_decay=0.65. Launching the same command again continues the run.",
    )
    p.add_argument("--weights", metavar="PATH_OR_NAME", help="the backbone to start from")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="the same architecture untrained (model.init_seed): the baseline to report against",
    )
    p.add_argument(
        "--train", metavar="DIR", help="labelled image folder to train on (<folder>/<class>/<image>)"
    )
    p.add_argument("--val", metavar="DIR", help="labelled held-out folder with the same classes")
    p.add_argument("--output", type=writable_folder, help="run directory (default: run.output_dir)")
    p.add_argument("--config", help=f"preset name ({', '.join(finetune_preset_names())}) or YAML file")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="PATH", help="continue from this fine-tuning checkpoint")
    group.add_argument(
        "--no-resume", action="store_true", help="start afresh even if the run has a checkpoint"
    )
    p.add_argument(
        "--weights-dir", metavar="DIR", help="folder holding released weights files (default: $DINO_HOME)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for option, key in (("weights", "model.weights"), ("train", "data.train"), ("val", "data.val"),
                        ("output", "run.output_dir")):  # fmt: skip
        value = getattr(args, option)
        if value:
            overrides.append(f"{key}={value}")
    if args.random_init:
        overrides.append("model.random_init=true")
    if args.weights_dir:
        overrides.append(f"model.weights_dir={args.weights_dir}")
    cfg = load_finetune_config(args.config, overrides)
    try:
        writable_folder(cfg.run.output_dir)
    except OutputPathError as err:
        raise ConfigError(f"run.output_dir: {err}") from err
    resume = args.resume if args.resume else not args.no_resume
    result = finetune(cfg, resume=resume)
    print(f"run directory: {cfg.run.output_dir}")
    print(json.dumps({"val_top1": round(result.top1, 2), "val_top5": round(result.top5, 2)}))
    return 0
