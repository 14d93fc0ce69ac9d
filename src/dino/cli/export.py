"""``dino export``: a backbone out to the released DINO layout, safetensors or timm (:mod:`dino.hub.export`)."""

from __future__ import annotations

import argparse

from dino.cli.arguments import add_weights_arguments
from dino.hub import EXPORT_FORMATS, describe_architecture, export_backbone
from dino.output_paths import writable_file_or_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino export``."""
    _add_export(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a backbone in the released DINO layout, as safetensors, or for timm",
        description="Export the teacher (or student) backbone of a run, one of our checkpoints, a released "
        "DINO file or name (dino_vits16, …), or a timm ViT state dict.",
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run directory, weights file or released name")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="dino", help="output format (default: dino)")
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="default: teacher (student needs a full training checkpoint or a run directory)",
    )
    p.add_argument(
        "--output",
        "-o",
        type=writable_file_or_folder,
        help="output file, or an existing folder to write the default file name into "
        "(default: beside the source, or <run>/export/)",
    )
    p.add_argument("--img-size", type=int, help="resample ViT position embeddings to this input size")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    add_weights_arguments(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    exported = export_backbone(
        args.source,
        args.format,
        args.output,
        which=args.which,
        img_size=args.img_size,
        weights_dir=args.weights_dir,
        download=args.download,
        overwrite=args.force,
    )
    w = exported.weights
    print(
        f"wrote {exported.path} ({args.format}: {describe_architecture(w.arch, w.patch_size, w.img_size, w.depth)}, from {w.source})"
    )
    print(f"load with: {exported.load_hint}")
    return 0
