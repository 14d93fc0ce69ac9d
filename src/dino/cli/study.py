"""``dino study``: run one of the paper's studies (or your own grid of variants) and compare the variants."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dino.output_paths import writable_folder
from dino.study import load_study, run_study, study_names, write_report

log = logging.getLogger("dino.cli")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="train a grid of variants for the same budget and compare them (the paper's studies)",
        description="Train every variant of a study file for its budget, score each with k-NN on held-out "
        "images, and write study.md (a table), study.json and figures (k-NN, collapse signatures, teacher vs "
        "student) in --out. Running it again continues where it stopped: finished variants are kept. "
        f"Shipped studies: {', '.join(study_names())} (the YAML files in dino/configs/studies).",
    )
    p.add_argument("study", help="a shipped study's name or a study YAML file")
    p.add_argument("--out", type=writable_folder, help="study folder (default: runs/studies/<name>)")
    p.add_argument(
        "--only", action="append", default=[], metavar="VARIANT", help="train only this variant (repeatable)"
    )
    p.add_argument(
        "--devices",
        help="comma-separated devices (cuda:0,cuda:1,…) to train that many variants at once, one per device; "
        "default: one variant after the other on run.device",
    )
    p.add_argument(
        "--report-only", action="store_true", help="write the report from what has run; train nothing"
    )
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # the per-device workers
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every variant")
    p.set_defaults(func=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    spec = load_study(args.study)
    out = Path(args.out) if args.out else Path("runs/studies") / spec.name
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    if args.report_only:
        report = write_report(spec, out)
    elif args.no_report:
        from dino.study.runner import train_variants

        train_variants(spec, out, args.overrides, args.only, devices)
        return 0
    else:
        report = run_study(spec, out, args.overrides, args.only, devices)
    print(f"study folder: {out}")
    for v in report.variants:
        knn = "–" if v.knn_top1 is None else f"{v.knn_top1:.2f} %"
        print(f"  {v.name}: k-NN top-1 {knn}; {v.signature}{'' if v.finished else ' (unfinished)'}")
    print(f"table: {out / 'study.md'}")
    return 0
