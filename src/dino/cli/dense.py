"""``dino videoseg``, ``dino attention``, ``dino retrieval`` and ``dino copydetect``: the evaluations on image
files that size images their own way (dense patch features, attention maps, retrieval descriptors).

Arguments only: the work is done by :mod:`dino.eval.video_segmentation`, :mod:`dino.eval.attention`,
:mod:`dino.eval.retrieval` and :mod:`dino.eval.copy_detection`. Inputs are checked before the model is
loaded, so a wrong path fails at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dino.cli.arguments import (
    MANY,
    ONE,
    add_model_arguments,
    add_normalization_arguments,
    device_from_args,
    model_from_args,
    normalization_options,
)
from dino.cli.output import write_results
from dino.eval.attention import (
    attention_jaccard,
    attention_over_images,
    attention_video,
    check_animation_output,
    list_images,
    read_video_frames,
    readable_images,
    save_attention_pictures,
)
from dino.eval.copy_detection import (
    CopydaysLayout,
    check_descriptor_support,
    evaluate_copydays,
    positives_for,
)
from dino.eval.davis_metrics import evaluate_results
from dino.eval.extract import model_info
from dino.eval.retrieval import RevisitedDataset, evaluate_retrieval, image_paths, load_ground_truth
from dino.eval.video_segmentation import (
    DAVIS_MEAN,
    DAVIS_STD,
    PropagationSettings,
    check_scorable,
    evaluate_davis,
    list_sequences,
    require_vit,
    segment_davis,
    sequence_frames,
)
from dino.models.vision_transformer import VisionTransformer
from dino.output_paths import writable_file, writable_folder

_QUIET_HELP = "no progress bars"
_EXIF_HELP = (
    "apply each file's EXIF orientation, as dino train, knn and extract do; by default images are read as the "
    "original script reads them, which ignores it (a file tagged as rotated then gives the stored, transposed "
    "picture)"
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dino videoseg``, ``dino attention``, ``dino retrieval`` and ``dino copydetect``."""
    _add_videoseg(sub)
    _add_attention(sub)
    _add_retrieval(sub)
    _add_copydetect(sub)


# --- dino videoseg ---------------------------------------------------------------------------------------


def _add_videoseg(sub: argparse._SubParsersAction) -> None:
    """Add ``dino videoseg``: DAVIS label propagation with frozen patch features, scored with J and F."""
    p = sub.add_parser(
        "videoseg",
        help="DAVIS video object segmentation by label propagation, scored with J&F",
        description="Propagate the first frame's annotation through each DAVIS sequence with frozen ViT patch "
        "features (context: first frame + 7 previous, exp(cos/0.1) affinities within 12 patches, top-5), "
        "write indexed PNGs with the dataset's palette, and score them with region similarity J and contour "
        "accuracy F (frames 1..N-2 of each sequence; void pixels count as background, as in the DAVIS "
        "scorer). Frames are normalised with the original eval_video_segmentation.py's constants, which the "
        "paper's DAVIS numbers come from (mean 0.485 0.456 0.406, std 0.228 0.224 0.225: 0.228, not "
        "ImageNet's 0.229, in the first channel), unless --mean/--std or the run's config say otherwise.",
    )
    _add_davis_arguments(p)
    _add_propagation_arguments(p)
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    add_normalization_arguments(p, fallback="the original DAVIS script's (see above)")
    add_model_arguments(p)
    p.set_defaults(func=run_videoseg, batch_size=8, processes=ONE)


def _add_davis_arguments(p: argparse.ArgumentParser) -> None:
    """The DAVIS data to read, where the predictions go, and whether and how they are scored."""
    p.add_argument(
        "--data", required=True, help="DAVIS root (JPEGImages/<res>/<seq>, Annotations/<res>/<seq>)"
    )
    p.add_argument("--resolution", default="480p", help="resolution folder (default: 480p)")
    p.add_argument("--split", default="val", help="ImageSets/<year>/<split>.txt to read (default: val)")
    p.add_argument("--year", default="2017", help="ImageSets year folder (default: 2017)")
    p.add_argument("--sequences", nargs="+", help="sequences to run (default: the split's list, else all)")
    p.add_argument("--max-frames", type=int, help="use only the first N frames of each sequence (quick runs)")
    p.add_argument(
        "--output-dir",
        default="davis-predictions",
        type=writable_folder,
        help="folder for the predicted PNGs, <dir>/<sequence>/<frame>.png (default: ./davis-predictions)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--score-only", action="store_true", help="score the PNGs already in --output-dir; no model needed"
    )
    mode.add_argument(
        "--no-score",
        action="store_true",
        help="only write the PNGs (sequences annotated on the first frame only)",
    )
    p.add_argument(
        "--exclude-void",
        action="store_true",
        help="leave void pixels (255) out of J and F (the DAVIS scorer counts them as background)",
    )


def _add_propagation_arguments(p: argparse.ArgumentParser) -> None:
    """The label propagation's settings (:class:`PropagationSettings`)."""
    g = p.add_argument_group("propagation (defaults: the paper's protocol)")
    g.add_argument("--n-last-frames", type=int, default=7, help="previous frames in the context (default: 7)")
    g.add_argument("--topk", type=int, default=5, help="affinities kept per target patch (default: 5)")
    g.add_argument(
        "--neighborhood", type=int, default=12, help="spatial radius in patches, 0: none (default: 12)"
    )
    g.add_argument("--temperature", type=float, default=0.1, help="affinity temperature (default: 0.1)")
    g.add_argument("--short-side", type=int, default=480, help="frames' short side in pixels (default: 480)")
    g.add_argument(
        "--size-multiple", type=int, help="round the long side down to this (default: 64, or the patch size)"
    )


def _davis_sequences(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """The DAVIS root and the sequences to evaluate, checked."""
    root = Path(args.data).expanduser()
    if not (root / "JPEGImages").is_dir() or not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root} is not a DAVIS root: it needs JPEGImages/ and Annotations/ folders")
    if args.max_frames is not None and args.max_frames < 2:
        raise ValueError(f"--max-frames {args.max_frames}: a sequence needs at least 2 frames")
    sequences = args.sequences or list_sequences(root, args.resolution, args.split, args.year)
    if not sequences:
        raise ValueError(f"no sequence to evaluate in {root}; pass --sequences")
    return root, sequences


def _propagation_settings(args: argparse.Namespace) -> PropagationSettings:
    return PropagationSettings(
        n_last_frames=args.n_last_frames,
        topk=args.topk,
        neighborhood=args.neighborhood,
        temperature=args.temperature,
        short_side=args.short_side,
        size_multiple=args.size_multiple,
    )


def run_videoseg(args: argparse.Namespace) -> int:
    root, sequences = _davis_sequences(args)
    title = "DAVIS video object segmentation (J&F, fractions)"
    if args.score_only:
        evaluated = evaluate_results(
            root, args.output_dir, sequences, args.resolution, args.max_frames, exclude_void=args.exclude_void
        )
        write_results({"predictions": str(args.output_dir), **evaluated}, args.output, title)
        return 0
    for seq in sequences:
        sequence_frames(root, seq, args.resolution, args.max_frames)
    if not args.no_score:
        check_scorable(root, sequences, args.resolution, args.max_frames)
    settings = _propagation_settings(args)
    norm = normalization_options(args, fallback=(DAVIS_MEAN, DAVIS_STD), protocol=True)
    loaded = model_from_args(args)
    model = require_vit(loaded.model, "video segmentation")
    device = device_from_args(args)
    run: Callable[..., dict[str, object] | None] = (
        segment_davis if args.no_score else partial(evaluate_davis, exclude_void=args.exclude_void)
    )
    scores = run(
        model,
        root,
        args.output_dir,
        sequences,
        settings,
        device,
        resolution=args.resolution,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
        mean=norm["mean"],
        std=norm["std"],
    )
    results = {
        "model": model_info(loaded),
        "settings": asdict(settings),
        "normalization": norm,
        "predictions": str(args.output_dir),
        **(scores or {"sequences": list(sequences)}),
    }
    write_results(results, args.output, title)
    return 0


# --- dino attention --------------------------------------------------------------------------------------


def _add_attention(sub: argparse._SubParsersAction) -> None:
    """Add ``dino attention``: last-block [CLS] attention maps, masks, animations and the Jaccard check."""
    p = sub.add_parser(
        "attention",
        help="last-layer [CLS] attention maps per head: heat maps, overlays, masks, videos, Jaccard",
        description="Save, for every image and every head, the last block's [CLS]-to-patch attention as a heat "
        "map, an overlay on the image, and a mask keeping --threshold of the head's attention mass. With "
        "--masks, score those masks against the ground-truth masks with the Jaccard index as the paper does "
        "(per object the best head, averaged over objects, then images), and against the whole foreground "
        "(label not 0/255, 255 ignored). With --video, animate a frame folder, GIF or video. Image files that "
        "cannot be decoded are skipped with a warning; the command fails only when none can.",
    )
    p.add_argument("input", metavar="IMAGE_OR_DIR", help="an image, a folder of images, or (--video) a video")
    p.add_argument(
        "--output-dir",
        default="attention",
        type=writable_folder,
        help="where the pictures go, one folder per image (default: ./attention)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=480,
        help="shorter side in pixels, 0: keep the original (default: 480)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="fraction of each head's attention mass kept (default: 0.6)",
    )
    p.add_argument("--masks", help="folder of ground-truth class masks <stem>.png (VOC style, 255 = void)")
    p.add_argument("--no-pictures", action="store_true", help="with --masks: only compute the Jaccard")
    p.add_argument("--max-images", type=int, help="use only the first N images or frames")
    g = p.add_argument_group("video")
    g.add_argument("--video", action="store_true", help="IMAGE_OR_DIR is a frame folder, GIF or video file")
    g.add_argument(
        "--animation",
        type=writable_file,
        help="output animation (.gif, or .mp4 with PyAV); default: OUTPUT_DIR/attention.gif",
    )
    g.add_argument("--fps", type=float, help="frames per second (default: the input's, else 10)")
    g.add_argument("--head", type=int, help="animate this head instead of the mean over heads")
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    add_normalization_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_attention, batch_size=8, processes=ONE)


def _run_attention_video(
    args: argparse.Namespace, source: Path, output_dir: Path, image_size: int | None
) -> int:
    """``dino attention --video``: animate the attention over a video's frames."""
    animation = Path(args.animation).expanduser() if args.animation else output_dir / "attention.gif"
    check_animation_output(animation)
    frames, native_fps = read_video_frames(source, args.max_images)
    norm = normalization_options(args)
    loaded = model_from_args(args)
    model = require_vit(loaded.model, "attention maps")
    n = attention_video(
        model, frames, animation, device_from_args(args), args.fps or native_fps or 10.0, image_size,
        args.head, args.batch_size, progress=not args.quiet, **norm,
    )  # fmt: skip
    write_results(
        {"model": model_info(loaded), "frames": n, "animation": str(animation)},
        args.output,
        "Attention video",
    )
    return 0


def _save_attention_maps(
    args: argparse.Namespace,
    model: VisionTransformer,
    images: list[Path],
    device: torch.device,
    image_size: int | None,
    output_dir: Path,
    norm: dict[str, list[float]],
) -> dict[str, object]:
    """Save the pictures of every image that decodes; returns what was done."""
    kept: list[Path] = []  # the images that decode; the others are skipped with a warning
    stream = attention_over_images(
        model, readable_images(images, kept), device, image_size, args.threshold, args.batch_size, **norm
    )
    for result in tqdm(stream, total=len(images), disable=args.quiet):
        path = kept[result.index]
        save_attention_pictures(result.image, result.attention, result.masks, output_dir / path.stem)
    return {
        "images": len(kept),
        "skipped_undecodable": len(images) - len(kept),
        "threshold": args.threshold,
        "pictures": str(output_dir),
    }


def run_attention(args: argparse.Namespace) -> int:
    source = Path(args.input).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; give an image, a folder of images or a video")
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold} must be in (0, 1]")
    image_size = args.image_size or None
    output_dir = Path(args.output_dir).expanduser()
    if args.video:
        return _run_attention_video(args, source, output_dir, image_size)
    images = list_images(source)[: args.max_images]
    if len(images) == 1:  # a single image that does not decode: say so before loading the model
        list(readable_images(images, []))
    mask_dir = Path(args.masks).expanduser() if args.masks else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise FileNotFoundError(f"--masks {mask_dir} is not a folder of <stem>.png masks")
    norm = normalization_options(args)
    loaded = model_from_args(args)
    model = require_vit(loaded.model, "attention maps")
    device = device_from_args(args)
    results: dict[str, object] = {
        "model": model_info(loaded),
        "image_size": args.image_size,
        "normalization": norm,
    }
    if mask_dir is not None:
        pictures = None if args.no_pictures else output_dir
        scores = attention_jaccard(
            model, images, mask_dir, device, image_size, args.threshold, args.batch_size, pictures,
            progress=not args.quiet, **norm,
        )  # fmt: skip
        results.update(scores)
        title = "Attention masks: Jaccard with the ground-truth masks (%)"
    else:
        results.update(_save_attention_maps(args, model, images, device, image_size, output_dir, norm))
        title = "Attention maps"
    if mask_dir is None or not args.no_pictures:
        results["pictures"] = str(output_dir)
    write_results(results, args.output, title, detail="per_image")
    return 0


# --- dino retrieval --------------------------------------------------------------------------------------


def _add_retrieval(sub: argparse._SubParsersAction) -> None:
    """Add ``dino retrieval``: revisited Oxford/Paris mAP and mP@k (Easy/Medium/Hard)."""
    p = sub.add_parser(
        "retrieval",
        help="landmark retrieval on revisited Oxford/Paris: mAP and mP@1,5,10 (Medium and Hard)",
        description="Rank the database of a revisited Oxford/Paris dataset for each query by cosine similarity "
        "of frozen global features ([CLS] for a ViT, pooled output for a ResNet), and report mAP and mP@k for the "
        "Easy, Medium and Hard setups exactly as the revisitop evaluation (junk images ignored). Images are read "
        "as the original eval_image_retrieval.py reads them, which the paper's table comes from: no EXIF "
        "rotation (--exif-rotate), shrunk to --imsize but never enlarged (--upscale), queries whole "
        "(--query-crop).",
    )
    p.add_argument(
        "--data",
        required=True,
        help="revisitop root (<root>/<dataset>/jpg, gnd_<dataset>.pkl) or dataset folder",
    )
    p.add_argument("--dataset", help="roxford5k, rparis6k, … (default: the only gnd_*.pkl found)")
    p.add_argument("--gnd", help="ground-truth pickle, overriding the one found under --data")
    p.add_argument("--images", help="image folder, overriding <dataset>/jpg")
    p.add_argument(
        "--imsize",
        type=int,
        default=224,
        help="shrink images whose long side is above this many pixels to it (Lanczos thumbnail, as the "
        "original script does; smaller ones keep their size unless --upscale) (default: 224)",
    )
    p.add_argument(
        "--upscale",
        action="store_true",
        help="also enlarge images whose long side is under --imsize to it (bicubic); the original script "
        "only shrinks",
    )
    p.add_argument("--exif-rotate", action="store_true", help=_EXIF_HELP)
    p.add_argument("--multiscale", action="store_true", help="average features at scales 1, 1/√2 and 1/2")
    p.add_argument(
        "--query-crop",
        action="store_true",
        help="crop queries to their bbx (the revisitop protocol); by default they are used whole, as the DINO "
        "script behind the paper's table does",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="k values of mP@k (default: 1 5 10)")
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    add_normalization_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_retrieval, batch_size=16, processes=MANY)


def run_retrieval(args: argparse.Namespace) -> int:
    if args.gnd and args.images:
        gnd_path, images = Path(args.gnd).expanduser(), Path(args.images).expanduser()
        name = args.dataset or gnd_path.stem.removeprefix("gnd_")
    else:
        found = RevisitedDataset.locate(args.data, args.dataset)
        name = found.name
        gnd_path = Path(args.gnd).expanduser() if args.gnd else found.ground_truth
        images = Path(args.images).expanduser() if args.images else found.images
    if args.imsize < 1 or any(k < 1 for k in args.ks):
        raise ValueError("--imsize and every --ks value must be positive")
    truth = load_ground_truth(gnd_path)
    image_paths(images, truth.imlist + truth.qimlist)  # every file present before the model loads
    norm = normalization_options(args)
    loaded = model_from_args(args)
    scores = evaluate_retrieval(
        loaded.model, images, truth, device_from_args(args), args.imsize, args.multiscale,
        args.query_crop, args.batch_size, args.num_workers, args.ks, progress=not args.quiet,
        upscale=args.upscale, exif_transpose=args.exif_rotate, **norm,
    )  # fmt: skip
    results = {
        "dataset": name,
        "model": model_info(loaded),
        "imsize": args.imsize,
        "upscale": args.upscale,
        "exif_rotate": args.exif_rotate,
        "multiscale": args.multiscale,
        "query_crop": args.query_crop,
        "normalization": norm,
        "queries": len(truth.qimlist),
        "database": len(truth.imlist),
        **scores,
    }
    write_results(results, args.output, f"Image retrieval on {name} (%)", detail="per_query")
    return 0


# --- dino copydetect -------------------------------------------------------------------------------------


def _add_copydetect(sub: argparse._SubParsersAction) -> None:
    """Add ``dino copydetect``: Copydays mAP per block with [CLS] ⊕ GeM descriptors and optional whitening."""
    p = sub.add_parser(
        "copydetect",
        help="copy detection on Copydays: mAP per block ([CLS] + GeM patch tokens, whitening, distractors)",
        description="Search every Copydays query block (strong, jpegqual/*, crops/*) among the originals (and "
        "optional distractors) by cosine similarity of [CLS] ⊕ GeM(p=4) patch-token descriptors, optionally "
        "PCA-whitened on a separate folder, and report the mAP of each block. Images are read as the original "
        "eval_copy_detection.py reads them: no EXIF rotation (--exif-rotate applies it).",
    )
    p.add_argument(
        "--data", required=True, help="Copydays root with original/, strong/, jpegqual/<q>/, crops/<p>/"
    )
    p.add_argument(
        "--whiten-dir", help="folder of images to learn the PCA whitening on (paper: 20k YFCC100M)"
    )
    p.add_argument(
        "--whitening",
        choices=("reference", "centred"),
        default="reference",
        help="reference (default): as the original eval_copy_detection.py, the paper's numbers (eigenvectors "
        "of the uncentred descriptors' second moments, all dimensions kept); centred: textbook PCA whitening",
    )
    p.add_argument(
        "--whiten-dim",
        type=int,
        help="components kept by the whitening (default: all; centred: at most images - 1)",
    )
    p.add_argument(
        "--distractors", help="folder of distractor images added to the database (paper: 10k YFCC100M)"
    )
    p.add_argument("--imsize", type=int, default=320, help="square input size in pixels (default: 320)")
    p.add_argument("--exif-rotate", action="store_true", help=_EXIF_HELP)
    p.add_argument("--max-rank", type=int, default=20, help="results scored per query, 0: all (default: 20)")
    p.add_argument(
        "--group-chars",
        type=int,
        default=4,
        help="name prefix identifying a Copydays image group (default: 4)",
    )
    p.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    add_normalization_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_copydetect, batch_size=32, processes=MANY)


def run_copydetect(args: argparse.Namespace) -> int:
    layout = CopydaysLayout.read(args.data)
    for paths in layout.blocks.values():
        for query in paths:
            positives_for(query, layout.originals, args.group_chars)
    for option, folder in (("--whiten-dir", args.whiten_dir), ("--distractors", args.distractors)):
        if folder and not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"{option} {folder} is not a folder")
    if args.imsize < 1:
        raise ValueError("--imsize must be positive")
    if args.whiten_dim is not None and args.whiten_dim < 1:
        raise ValueError(f"--whiten-dim {args.whiten_dim}: keep at least 1 component (or leave it out: all)")
    norm = normalization_options(args)
    loaded = model_from_args(args)
    check_descriptor_support(loaded.model)
    scores = evaluate_copydays(
        loaded.model, args.data, device_from_args(args), args.imsize, args.whiten_dir, args.whiten_dim,
        args.distractors, args.max_rank, args.group_chars, args.batch_size, args.num_workers,
        progress=not args.quiet, whitening_kind=args.whitening, exif_transpose=args.exif_rotate, **norm,
    )  # fmt: skip
    results = {
        "model": model_info(loaded),
        "imsize": args.imsize,
        "exif_rotate": args.exif_rotate,
        "max_rank": args.max_rank,
        "normalization": norm,
        **scores,
    }
    write_results(results, args.output, "Copy detection on Copydays (mAP, %)", detail="per_query")
    return 0
