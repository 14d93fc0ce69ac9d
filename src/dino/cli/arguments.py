"""The options every command that runs a backbone shares: naming the weights, the device, the precision and
the images, and turning them into a model and an image transform.

Every evaluation takes the same model options (:func:`add_model_arguments`) and loads the backbone the same
way (:func:`model_from_args`, through :func:`dino.hub.load`); ``dino export`` names weights the same way
(:func:`add_weights_arguments`). Devices and precisions take the names ``dino train`` takes in
``run.device`` and ``run.precision`` (:mod:`dino.devices`). Evaluation images go through one deterministic
transform whose defaults follow the model (:func:`add_image_arguments`, :func:`eval_transform_from_args`);
the evaluations that size images their own way share its normalisation options
(:func:`add_normalization_arguments`, :func:`normalization_from_args`, :func:`normalization_options`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from dino.devices import DEVICE_NAMES, FEATURE_PRECISIONS, is_device_name, resolve_device
from dino.hub import (
    DEFAULT_HOME,
    ENV_HOME,
    LoadedBackbone,
    TrainingImageSettings,
    build_untrained,
    load,
    training_image_settings,
)
from dino.output_paths import writable_file


def add_weights_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--weights-dir`` and ``--download``, for commands that accept released model names."""
    parser.add_argument(
        "--weights-dir",
        metavar="DIR",
        help=f"folder holding the released weights files (default: ${ENV_HOME} or {DEFAULT_HOME})",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch a released model's file from the original URL into the weights folder if it is missing",
    )


def device_name(value: str) -> str:
    """``--device``: a device name as ``run.device`` takes it, checked before any work starts."""
    if not is_device_name(value):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_NAMES}, got {value!r}")
    return value


def device_from_args(args: argparse.Namespace) -> torch.device:
    """The device ``--device`` names, on this machine (:func:`dino.devices.resolve_device`); under torchrun,
    this process's GPU (``LOCAL_RANK``)."""
    local_rank, world_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return resolve_device(getattr(args, "device", "auto"), local_rank, world_size, setting="--device")


MANY, ONE = "many", "one"
"""A command's ``processes`` default: ``MANY`` runs under torchrun with its feature extraction split across
the processes (:func:`dino.cli.processes.command_processes`); ``ONE`` refuses a torchrun launch."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that name the model, the device, batching and the results file."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--weights",
        metavar="PATH_OR_NAME",
        help="run directory, training checkpoint, backbone .pth (ours or the released DINO files), or "
        "torchvision:NAME (with --random-init); optional with --random-init --arch",
    )
    g.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a training checkpoint to evaluate (default: teacher, as in the paper)",
    )
    g.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the same architecture untrained: the baseline every number should be reported against",
    )
    g.add_argument(
        "--init-seed",
        type=int,
        default=0,
        help="seed of the --random-init weights, so that repeated runs and cached features agree (default 0)",
    )
    g.add_argument(
        "--arch",
        help="architecture (vit_tiny/small/base/large/giant, resnet50, ...); default: from the weights",
    )
    g.add_argument("--patch-size", type=int, help="ViT patch size; default: from the weights")
    g.add_argument(
        "--depth",
        type=int,
        default=0,
        help="ViT blocks for --random-init --arch without weights (0: standard)",
    )
    add_weights_arguments(g)
    g = parser.add_argument_group("execution")
    g.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help=f"{DEVICE_NAMES}, as run.device (default auto: cuda when available, else cpu)",
    )
    g.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    workers = default_num_workers()
    g.add_argument(
        "--num-workers",
        type=int,
        default=workers,
        help=f"data-loading processes (default: {workers}: the CPUs this process may use, at most 4)",
    )
    g.add_argument("--output", metavar="JSON", type=writable_file, help="write the results to this JSON file")


def default_num_workers() -> int:
    """Loader processes by default: the CPUs this process may run on, at most 4. More processes than cores
    only compete for them (and PyTorch warns about it once per loader)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the commands that run the backbone over image folders for features."""
    parser.add_argument(
        "--precision",
        choices=FEATURE_PRECISIONS,
        default="auto",
        help="feature extraction: auto = bfloat16 autocast on a GPU (several times faster), fp32 on a CPU; "
        "fp32 computes as the original scripts do (features then match them to float rounding)",
    )


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--resize``/``--crop-size``/``--mean``/``--std`` for the deterministic evaluation view."""
    g = parser.add_argument_group("images")
    g.add_argument(
        "--crop-size",
        type=int,
        help="centre-crop size; default: the model's training crop size when known (224 otherwise)",
    )
    g.add_argument(
        "--resize", type=int, help="shorter side before cropping; default: crop size × 8/7 (256 for 224)"
    )
    add_normalization_arguments(g)


def add_normalization_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, fallback: str = "ImageNet's"
) -> None:
    """Add ``--mean``/``--std`` (defaults: :func:`normalization_from_args`) to a parser or an option group;
    ``fallback`` names the values used when neither the options nor the run's config give them."""
    parser.add_argument(
        "--mean", type=float, nargs=3, help=f"normalisation mean; default: the run's config, else {fallback}"
    )
    parser.add_argument(
        "--std", type=float, nargs=3, help=f"normalisation std; default: the run's config, else {fallback}"
    )


def model_from_args(args: argparse.Namespace) -> LoadedBackbone:
    """The backbone named by the model options, in eval mode, on ``args.device``.

    With ``--random-init --arch A`` and no ``--weights`` the architecture is built untrained directly; random
    weights are drawn from ``--init-seed``, so two runs evaluate the same baseline.
    """
    device = device_from_args(args)
    weights = getattr(args, "weights", None)
    with torch.random.fork_rng(devices=[]):  # seed the untrained weights without touching the caller's RNG
        torch.manual_seed(getattr(args, "init_seed", 0))
        if weights is None:
            if not (args.random_init and args.arch):
                raise ValueError(
                    "no model given: pass --weights PATH_OR_NAME, or --random-init --arch ARCH for a baseline"
                )
            loaded = build_untrained(args.arch, args.patch_size or 16, getattr(args, "depth", 0))
        else:
            # Paths, run directories, released names (dino_vits16, …) and torchvision:NAME all resolve in
            # the hub, which says what is missing and where to put it.
            loaded = load(
                weights,
                which=args.which,
                random_init=args.random_init,
                arch=args.arch,
                patch_size=args.patch_size,
                weights_dir=getattr(args, "weights_dir", None),
                download=getattr(args, "download", False),
            )
    loaded.model.to(device).eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


def default_crop_size(loaded: LoadedBackbone) -> int:
    """The image size a ViT's position embeddings were trained at; for other backbones the size their
    weights declare (32 for the small-image ResNet stems, else 224)."""
    patch_embed = getattr(loaded.model, "patch_embed", None)
    return int(getattr(patch_embed, "img_size", loaded.img_size))


def eval_transform_from_args(args: argparse.Namespace, loaded: LoadedBackbone) -> EvalTransform:
    """The evaluation view: ``--crop-size`` (default the training crop), ``--resize`` (default crop × 8/7)."""
    stored = training_image_settings(getattr(args, "weights", None))
    crop = args.crop_size or stored.crop_size or default_crop_size(loaded)
    resize = args.resize or int(round(crop * 8 / 7))
    if resize < crop:
        raise ValueError(
            f"--resize {resize} is smaller than --crop-size {crop}; use a resize of at least the crop"
        )
    mean, std = normalization_from_args(args, stored)
    return EvalTransform(resize=resize, crop_size=crop, mean=mean, std=std)


def normalization_from_args(
    args: argparse.Namespace,
    stored: TrainingImageSettings | None = None,
    fallback: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std): ``--mean``/``--std``, else the training config's (``stored``, read from ``--weights``
    when not given), else ``fallback`` (ImageNet's unless a protocol has its own)."""
    if stored is None:
        stored = training_image_settings(getattr(args, "weights", None))
    return args.mean or stored.mean or fallback[0], args.std or stored.std or fallback[1]


def normalization_options(
    args: argparse.Namespace,
    fallback: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
    protocol: bool = False,
) -> dict[str, list[float]]:
    """``mean``/``std`` keyword arguments (:func:`normalization_from_args`: ``fallback`` when neither the
    options nor the run's config give them), the std checked positive. With ``protocol`` (a protocol that
    normalises with constants of its own), a run trained on ImageNet's statistics gets the protocol's
    constants, as the original evaluates every model; only other statistics (a run on CIFAR) are kept."""
    stored = None
    if protocol:
        stored = training_image_settings(getattr(args, "weights", None))
        if _close(stored.mean, IMAGENET_MEAN) and _close(stored.std, IMAGENET_STD):
            stored = TrainingImageSettings(crop_size=stored.crop_size)
    mean, std = normalization_from_args(args, stored, fallback=fallback)
    if any(v <= 0 for v in std):
        raise ValueError(f"--std values must be positive, got {std}")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _close(values: Sequence[float] | None, reference: Sequence[float]) -> bool:
    return values is not None and all(abs(a - b) < 1e-6 for a, b in zip(values, reference, strict=True))
