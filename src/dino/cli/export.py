"""``dino export``: a backbone out to the released DINO layout, safetensors or timm (:mod:`dino.hub.export`),
or as a graph to run without this package: ONNX or ``torch.export`` (:mod:`dino.hub.graph_export`)."""

from __future__ import annotations

import argparse

from dino.cli.arguments import add_weights_arguments
from dino.finetune.export import export_classifier, is_finetune_source
from dino.hub import EXPORT_FORMATS, WeightsError, describe_architecture, export_backbone
from dino.hub.graph_export import GRAPH_FORMATS, export_graph
from dino.output_paths import writable_file_or_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino export``."""
    _add_export(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a backbone in the released DINO layout, as safetensors, for timm, or as ONNX / torch.export",
        description="Export the teacher (or student) backbone of a run, one of our checkpoints, a released "
        "DINO file or name (dino_vits16, …), or a timm ViT state dict; or, with --format timm, the whole "
        "classifier (backbone + head) of a `dino finetune` run.",
    )
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run directory, weights file or released name")
    p.add_argument(
        "--format",
        choices=(*EXPORT_FORMATS, *GRAPH_FORMATS),
        default="dino",
        help="weights: dino (default), safetensors, timm; graphs with a dynamic batch axis: onnx, pt2 "
        "(torch.export)",
    )
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
    p.add_argument(
        "--img-size",
        type=int,
        help="resample ViT position embeddings to this input size; for onnx/pt2 also the graph's input size "
        "(default: the size the weights are for)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    add_weights_arguments(p)
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    if is_finetune_source(args.source):
        return _export_classifier(args)
    if args.format in GRAPH_FORMATS:
        return _run_graph_export(args)
    exported = export_backbone(args.source, args.format, args.output, **_source_options(args))
    w = exported.weights
    print(
        f"wrote {exported.path} ({args.format}: {describe_architecture(w.arch, w.patch_size, w.img_size, w.depth)}, from {w.source})"
    )
    print(f"load with: {exported.load_hint}")
    return 0


def _source_options(args: argparse.Namespace) -> dict:
    """What the weight and graph exports both take from the command line: which network, the input size,
    where released weights are, whether to download, whether to overwrite."""
    return {
        "which": args.which,
        "img_size": args.img_size,
        "weights_dir": args.weights_dir,
        "download": args.download,
        "overwrite": args.force,
    }


def _run_graph_export(args: argparse.Namespace) -> int:
    graph = export_graph(args.source, args.format, args.output, **_source_options(args))
    b = graph.backbone
    print(
        f"wrote {graph.path} ({args.format}: {describe_architecture(b.arch, b.patch_size, graph.img_size, b.depth)}, "
        f"input [batch, 3, {graph.img_size}, {graph.img_size}] -> [batch, {b.embed_dim}], from {b.source})"
    )
    print(f"checked with {graph.checked_with}: max |difference| from PyTorch {graph.max_abs_diff:.2e}")
    print(f"run with: {graph.load_hint}")
    return 0


def _export_classifier(args: argparse.Namespace) -> int:
    """A `dino finetune` run's classifier (backbone and head), for timm."""
    if args.format != "timm":
        raise WeightsError(
            f"{args.source} is a fine-tuned classifier: export it with --format timm (its weights are in "
            "classifier.pth already)"
        )
    exported = export_classifier(args.source, args.output, overwrite=args.force)
    print(f"wrote {exported.path} (timm: {exported.timm_name}, {exported.num_classes} classes)")
    print(f"load with: {exported.load_hint}")
    return 0
