"""What every evaluation command shares: naming the model, the device, the image transform, the results.

Every ``dino <evaluation>`` command takes the same model options (:func:`add_model_arguments`), loads the
backbone the same way (:func:`model_from_args`, through :func:`dino.hub.load_backbone`) and reports the same
way (:func:`write_results`: a table on stdout and a JSON file). Evaluation images go through one
deterministic transform whose defaults follow the model (:func:`add_image_arguments`,
:func:`eval_transform_from_args`); the dense protocols, which size images their own way, share its
normalisation options (:func:`add_normalization_arguments`, :func:`normalization_from_args`) and read image
files through :class:`ImageFileDataset`. Seeded per-class subsets (validation splits, low-shot label
subsets) all draw from :func:`shuffled_class_members`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dino.data.datasets import ImageDecodeError, load_rgb
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from dino.hub import LoadedBackbone, add_weights_arguments, load_backbone
from dino.output_paths import writable_file

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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
        "--arch", help="architecture (vit_tiny/small/base/large, resnet50, ...); default: from the weights"
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
        "--device", choices=DEVICE_CHOICES, default="auto", help="auto = cuda when available, else cpu"
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


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → cuda when available, else cpu; refuses cuda on a machine without a GPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


PRECISIONS = ("auto", "bf16", "fp32")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision`` of the commands that run the backbone over image folders for features."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="feature extraction: auto = bfloat16 autocast on a GPU (several times faster), fp32 on a CPU; "
        "fp32 computes as the original scripts do (features then match them to float rounding)",
    )


def autocast_dtype_for(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of feature extraction: bfloat16 on CUDA for ``auto`` (fast, no overflow), None
    (full precision) for ``fp32`` and on other devices; ``bf16`` asks for it anywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class TrainingImageSettings:
    """What the model saw during training, when its files say so (None where unknown)."""

    crop_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def model_from_args(args: argparse.Namespace) -> LoadedBackbone:
    """The backbone named by the model options, in eval mode, on ``args.device``.

    With ``--random-init --arch A`` and no ``--weights`` the architecture is built untrained directly; random
    weights are drawn from ``--init-seed``, so two runs evaluate the same baseline.
    """
    device = resolve_device(getattr(args, "device", "auto"))
    weights = getattr(args, "weights", None)
    with torch.random.fork_rng(devices=[]):  # seed the untrained weights without touching the caller's RNG
        torch.manual_seed(getattr(args, "init_seed", 0))
        if weights is None:
            if not (args.random_init and args.arch):
                raise ValueError(
                    "no model given: pass --weights PATH_OR_NAME, or --random-init --arch ARCH for a baseline"
                )
            loaded = _untrained(args.arch, args.patch_size or 16, getattr(args, "depth", 0))
        else:
            # Paths, run directories, released names (dino_vits16, …) and torchvision:NAME all resolve in
            # the hub, which says what is missing and where to put it.
            loaded = load_backbone(
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


def _untrained(arch: str, patch_size: int, depth: int) -> LoadedBackbone:
    from dino.models.backbones import build_backbone, convnet_image_size

    model, dim = build_backbone(arch, patch_size, 224, 0.0, depth)
    is_vit = arch.startswith("vit_")
    n_blocks = len(model.blocks) if is_vit else 0
    size = 224 if is_vit else convnet_image_size(arch)
    return LoadedBackbone(model.eval(), arch, patch_size if is_vit else 0, dim, "random init", n_blocks, size)


def model_info(loaded: LoadedBackbone) -> dict[str, Any]:
    """Plain-data description of a loaded backbone, for results and feature files."""
    return {
        "arch": loaded.arch,
        "patch_size": loaded.patch_size,
        "embed_dim": loaded.embed_dim,
        "depth": num_blocks(loaded.model),
        "source": loaded.source,
    }


def num_blocks(model: torch.nn.Module) -> int:
    """Transformer blocks of a ViT (0 for other backbones)."""
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else 0


def training_image_settings(weights: str | None) -> TrainingImageSettings:
    """Crop size and normalisation from the training config stored with ``weights``, when there is one.

    A run directory holds ``config.yaml``; our training checkpoints hold the config as a dict. Backbone-only
    files carry none (their crop size is still known from the model, see :func:`default_crop_size`).
    """
    if not weights or str(weights).startswith("torchvision:"):
        return TrainingImageSettings()
    path = Path(weights).expanduser()
    data: Mapping[str, Any] | None = None
    if path.is_dir() and (path / "config.yaml").is_file():
        import yaml

        raw = yaml.safe_load((path / "config.yaml").read_text())
        data = raw.get("data") if isinstance(raw, dict) else None
    elif path.is_file():
        data = _checkpoint_data_config(path)
    if not isinstance(data, Mapping):
        return TrainingImageSettings()
    crop = data.get("global_crop_size")
    mean, std = data.get("mean"), data.get("std")
    return TrainingImageSettings(
        int(crop) if crop else None,
        tuple(float(v) for v in mean) if mean and len(mean) == 3 else None,  # type: ignore[arg-type]
        tuple(float(v) for v in std) if std and len(std) == 3 else None,  # type: ignore[arg-type]
    )


def _checkpoint_data_config(path: Path) -> Mapping[str, Any] | None:
    """The ``data`` section of one of our checkpoints, read lazily (memory-mapped), or None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours, legacy format or refused: no stored settings, the loader reports problems
        return None
    config = obj.get("config") if isinstance(obj, dict) else None
    return config.get("data") if isinstance(config, dict) else None


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


def image_tensor(image: Image.Image) -> Tensor:
    """[3, H, W] float tensor in [0, 1] of an 8-bit RGB picture."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0


def normalize(pixels: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(pixels - mean) / std`` per channel of [3, H, W] pixels."""
    return (pixels - torch.as_tensor(mean).view(3, 1, 1)) / torch.as_tensor(std).view(3, 1, 1)


class ImageFileDataset(Dataset):
    """Base of the datasets over a list of image files: ``paths``, the normalisation and the decoding.

    Subclasses size each image their own way in ``__getitem__``, from :meth:`load` (or their own decoder),
    and finish with :meth:`normalized`. ``exif_transpose`` applies each file's EXIF orientation.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        exif_transpose: bool = True,
    ) -> None:
        self.paths = list(paths)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """The ``index``-th file as RGB (:func:`~dino.data.datasets.load_rgb`); ValueError if unusable."""
        try:
            return load_rgb(self.paths[index], exif_transpose=self.exif_transpose)
        except ImageDecodeError as err:
            raise ValueError(f"cannot use {self.paths[index]}: {err}") from err

    def normalized(self, image: Image.Image | Tensor) -> Tensor:
        """A picture (or its [3, H, W] pixels in [0, 1]) normalised with the dataset's mean and std."""
        pixels = image if isinstance(image, Tensor) else image_tensor(image)
        return normalize(pixels, self.mean, self.std)


def shuffled_class_members(labels: Tensor, seed: int, labelled_only: bool = False) -> Iterator[Tensor]:
    """The sample indices of each class c of ``labels`` (ascending c), in a random order seeded by
    ``seed × 1000003 + c``: the same seed gives the same order however the other classes change.

    ``labelled_only`` skips negative labels (unlabelled samples).
    """
    labels = labels.cpu().long()
    for c in torch.unique(labels).tolist():
        if labelled_only and c < 0:
            continue
        members = (labels == c).nonzero().flatten()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + c)
        yield members[torch.randperm(members.numel(), generator=generator)]


def transform_info(transform: EvalTransform) -> dict[str, Any]:
    """Plain-data description of an evaluation transform."""
    return {
        "resize": transform.resize,
        "crop_size": transform.crop_size,
        "mean": list(transform.mean),
        "std": list(transform.std),
    }


def write_results(results: Mapping[str, Any], path: str | Path | None, title: str) -> None:
    """Print ``results`` as a two-column markdown table under ``title`` and write them as JSON to ``path``.

    Nested dicts become dotted keys in the table; the JSON keeps the nesting. Non-finite floats are written
    as null so that the file stays valid JSON.
    """
    rows = list(_flatten(results))
    width = max([len("metric")] + [len(k) for k, _ in rows])
    lines = [f"## {title}", "", f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {_format_value(v)} |" for k, v in rows]
    print("\n".join(lines), file=sys.stdout, flush=True)
    if path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
        tmp.replace(path)


def _flatten(data: Mapping[str, Any], prefix: str = ""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if 1 <= abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
