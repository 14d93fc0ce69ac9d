"""Loading weights safely and exactly: the released DINO files, our runs and exports, timm state dicts.

Every ``.pth`` file is read with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the
released full checkpoints pickle, is the one class allowed); ``.safetensors`` files cannot carry code at all.
A checkpoint that carries code is refused, never executed. Keys are normalised (``module.`` / ``backbone.``
prefixes, the ``teacher``/``student`` entry of a full checkpoint, a classifier ``head``/``fc``) and loaded
strictly: a mismatch is an error that names the keys and the likely cause.

The original model names (``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8``,
``dino_resnet50``) resolve to their architecture and to the released file name in a cache folder
(``$DINO_HOME``, default ``~/.cache/dino``); a file is downloaded only when the caller passes
``download=True``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import nn

from dino.models.backbones import SMALL_STEM_SUFFIX, convnet_image_size

log = logging.getLogger(__name__)

Which = Literal["teacher", "student"]

ENV_HOME = "DINO_HOME"
DEFAULT_HOME = "~/.cache/dino"
SAFETENSORS_FORMAT = "dino-backbone"  # metadata "format" of our safetensors exports
SAFETENSORS_FORMAT_VERSION = 1
_URL_ROOT = "https://dl.fbaipublicfiles.com/dino"


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to do."""


# --- The released models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One model of the original DINO release: its architecture and file names."""

    arch: str
    patch_size: int
    stem: str  # e.g. dino_deitsmall16_pretrain

    @property
    def file(self) -> str:
        """Backbone-only teacher weights."""
        return f"{self.stem}.pth"

    @property
    def full_file(self) -> str:
        """Full training checkpoint (student, teacher, heads, center, optimizer, args)."""
        return f"{self.stem}_full_checkpoint.pth"

    def url(self, full: bool = False) -> str:
        return f"{_URL_ROOT}/{self.stem}/{self.full_file if full else self.file}"


RELEASES: Mapping[str, Release] = MappingProxyType(
    {
        "dino_vits16": Release("vit_small", 16, "dino_deitsmall16_pretrain"),
        "dino_vits8": Release("vit_small", 8, "dino_deitsmall8_pretrain"),
        "dino_vitb16": Release("vit_base", 16, "dino_vitbase16_pretrain"),
        "dino_vitb8": Release("vit_base", 8, "dino_vitbase8_pretrain"),
        "dino_resnet50": Release("resnet50", 0, "dino_resnet50_pretrain"),
    }
)


def weights_folder(override: str | Path | None = None) -> Path:
    """The cache folder for released weights: ``override``, else ``$DINO_HOME``, else ``~/.cache/dino``."""
    return Path(override or os.environ.get(ENV_HOME) or DEFAULT_HOME).expanduser()


def resolve_weights(
    name_or_path: str | Path,
    weights_dir: str | Path | None = None,
    download: bool = False,
    full: bool = False,
) -> Path:
    """The local file (or run directory) that ``name_or_path`` designates.

    Accepts an existing path, a released model name (its backbone file, or with ``full`` its full training
    checkpoint, in the cache folder), a bare file name found in the cache folder, or an ``http(s)`` URL
    (cached under its file name). Missing files are fetched only with ``download=True``.
    """
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    cache = weights_folder(weights_dir)
    if spec in RELEASES:
        release = RELEASES[spec]
        target = cache / (release.full_file if full else release.file)
        url = release.url(full)
    elif spec.startswith(("https://", "http://")):
        target, url = cache / spec.rstrip("/").rsplit("/", 1)[-1], spec
    elif "/" not in spec and (cache / spec).is_file():
        return cache / spec
    else:
        raise WeightsError(
            f"{spec} is neither an existing file or run directory nor a released model name "
            f"({', '.join(RELEASES)}); check the path"
        )
    if target.is_file():
        return target
    if not download:
        raise WeightsError(
            f"{spec} needs {target}, which is missing: download {url} into {cache} (or point ${ENV_HOME} / "
            f"--weights-dir at the folder holding it), or pass --download (download=True) to fetch it"
        )
    return _download(url, target)


def _download(url: str, target: Path) -> Path:
    """Fetch ``url`` to ``target`` atomically (a partial download never looks like a weights file)."""
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    log.info("downloading %s to %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh, length=1 << 20)
        os.replace(tmp, target)
    except OSError as err:  # urllib.error.URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download {url} ({err}); fetch it yourself into {target.parent} and try again"
        ) from err
    return target


# --- Reading files safely ---------------------------------------------------------------------------------


# Lines of torch's weights-only error text that say nothing about the file itself.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def read_weights_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``.pth`` file without executing code (``argparse.Namespace`` is the one object allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        culprit = next((line for line in lines if "GLOBAL" in line), "")
        if culprit:
            raise WeightsError(
                f"refused to load {path}: it holds Python objects or code, not just tensors and plain data "
                f"({culprit}); nothing in it was run. Only if you trust its origin, re-save its tensors as a "
                "plain state dict"
            ) from err
        detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), type(err).__name__)
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({detail}); it is damaged or not a weights file "
            "(nothing in it was run)"
        ) from err
    except Exception as err:
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(err).__name__}: {err})"
        ) from err


def is_safetensors(path: Path) -> bool:
    """True for a safetensors file (by suffix, or by its JSON header for files named otherwise)."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[:2] != b"PK" and head[8:9] == b"{"


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file (the format cannot carry code)."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise WeightsError(f"{path} is a safetensors file: pip install 'dino[safetensors]'") from err
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as err:
        raise WeightsError(f"cannot read {path} as safetensors ({type(err).__name__}: {err})") from err


# --- Normalising state dicts ------------------------------------------------------------------------------

_CLASSIFIER_KEYS = ("head.weight", "head.bias", "fc.weight", "fc.bias")
# torch.nn.utils.parametrizations.weight_norm names → the old-style names our head (and the release) use.
_NEW_WEIGHT_NORM = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def backbone_state_dict(obj: Any, which: Which = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors (released key layout) from any supported file content.

    Handles backbone-only state dicts (ours, the released ones, timm's: a plain classifier ``head``/``fc``
    is dropped), full training checkpoints (``which`` picks the teacher or the student; ``module.`` and
    ``backbone.`` prefixes are removed) and ``{"model": …}`` / ``{"state_dict": …}`` wrappers.
    """
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        raise WeightsError(f"this checkpoint has no {which!r} entry; pick the other with which=…")
    elif isinstance(obj, dict) and not _is_tensor_dict(obj):
        wrapped = [k for k in ("model", "state_dict") if _is_tensor_dict(obj.get(k))]
        if wrapped:
            obj = obj[wrapped[0]]
    if not _is_tensor_dict(obj):
        raise WeightsError(
            "the file holds no state dict of tensors (neither a backbone nor a training checkpoint)"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    # A linear classifier (timm's ``head``, torchvision's ``fc``) is not part of the backbone.
    return {k: v for k, v in state.items() if k not in _CLASSIFIER_KEYS}


def _model_state(obj: Any, name: str, origin: str) -> dict[str, torch.Tensor]:
    """A released full checkpoint's ``student``/``teacher`` as our ``backbone.*``/``head.*`` state dict."""
    if not _is_tensor_dict(obj):
        raise WeightsError(f"{origin}: the {name!r} entry is not a state dict of tensors")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        for new, old in _NEW_WEIGHT_NORM.items():
            key = key.replace(new, old)
        state[key] = value
    strays = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
    if strays or not any(k.startswith("head.") for k in state):
        raise WeightsError(
            f"{origin}: the {name!r} entry is not a DINO backbone + head (stray keys {_short(strays)}); "
            "is it a full DINO training checkpoint?"
        )
    return state


# --- Architecture ---------------------------------------------------------------------------------------


_HEADS_BY_DIM = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_RESNET_BLOCKS = {
    (2, 2, 2, 2, False): "resnet18",
    (3, 4, 6, 3, False): "resnet34",
    (3, 4, 6, 3, True): "resnet50",
    (3, 4, 23, 3, True): "resnet101",
    (3, 8, 36, 3, True): "resnet152",
}


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int, int, int]:
    """(arch, patch_size, img_size, depth) read from backbone tensor shapes."""
    if "patch_embed.proj.weight" in state and "cls_token" in state:
        dim = int(state["cls_token"].shape[-1])
        if dim not in _HEADS_BY_DIM:
            raise WeightsError(
                f"ViT width {dim} is not one of {sorted(_HEADS_BY_DIM)} (tiny/small/base/large)"
            )
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = pos_embed_grid(state) or 224 // patch
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"vit_{_HEADS_BY_DIM[dim]}", patch, grid * patch, depth
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        blocks = tuple(
            len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
        )
        bottleneck = "layer1.0.conv3.weight" in state
        name = _RESNET_BLOCKS.get((*blocks, bottleneck))
        if bottleneck and blocks == (3, 4, 6, 3) and state["layer1.0.conv1.weight"].shape[0] == 128:
            name = "wide_resnet50_2"
        if name is None:
            raise WeightsError(f"unrecognised ResNet layout {blocks} (bottleneck={bottleneck})")
        if state["conv1.weight"].shape[-1] == 3:  # the small-image stem (3×3 first convolution)
            name += SMALL_STEM_SUFFIX
        return name, 0, convnet_image_size(name), 0
    raise WeightsError(
        "cannot tell the architecture from these weights (neither a ViT nor a torchvision ResNet)"
    )


def pos_embed_grid(state: dict[str, torch.Tensor]) -> int | None:
    """The side S of the square patch grid the ViT position embeddings of ``state`` are stored for (None
    without ``pos_embed``), or a WeightsError for a layout that cannot be loaded or resampled."""
    problem = _pos_embed_problem(state)
    if problem:
        raise WeightsError(problem)
    return math.isqrt(int(state["pos_embed"].shape[1]) - 1) if "pos_embed" in state else None


def _pos_embed_problem(state: dict[str, torch.Tensor]) -> str | None:
    """Why the position embeddings of ``state`` are unusable, or None. The DINO ViT (like the original)
    stores one class-token position then an S×S patch grid: [1, 1 + S*S, D]."""
    pos = state.get("pos_embed")
    if pos is None:
        return None
    if pos.ndim != 3 or pos.shape[0] != 1:
        return f"pos_embed has shape {tuple(pos.shape)}, not [1, 1 + S*S, dim]; is it a ViT state dict?"
    n = int(pos.shape[1])
    if n >= 2 and math.isqrt(n - 1) ** 2 == n - 1:
        return None
    side = math.isqrt(n)
    if side * side == n:
        layout = (
            f"{n} = {side}×{side} positions: a patch grid with no class-token position (timm's "
            "no_embed_class=True), or a class token plus a non-square grid"
        )
    else:
        layout = f"{n} positions: a class token plus {n - 1} patches, which is not a square S×S grid"
    return (
        f"the ViT position embeddings hold {layout}. Position embeddings with no class-token position or "
        "for a non-square patch grid are not supported (img_size cannot resample them either): only "
        "ViTs with a class-token position and a square grid, as DINO's, load"
    )


def describe_architecture(arch: str, patch_size: int, img_size: int, depth: int) -> str:
    """``vit_small/16 (224 px, 12 blocks)`` or ``resnet50``."""
    return f"{arch}/{patch_size} ({img_size} px, {depth} blocks)" if arch.startswith("vit_") else arch


def resize_pos_embed(state: dict[str, torch.Tensor], img_size: int) -> dict[str, torch.Tensor]:
    """``state`` with its ViT position embeddings resampled (bicubic) to an ``img_size`` input grid.

    Uses the same resampling as the model does on the fly, so a model loaded at ``img_size`` gives the
    features the native model gives on ``img_size`` inputs. Non-ViT states are returned unchanged.
    """
    from dino.models.vision_transformer import resample_pos_embed

    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        return state
    pos_embed_grid(state)  # refuses layouts the resampling cannot handle
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = img_size // patch
    if grid < 1 or grid * patch != img_size:
        raise WeightsError(f"img_size {img_size} must be a positive multiple of the patch size {patch}")
    if int(state["pos_embed"].shape[1]) == grid * grid + 1:
        return state
    return {**state, "pos_embed": resample_pos_embed(state["pos_embed"], (grid, grid))}


# --- Strict loading with actionable errors ----------------------------------------------------------------

# Keys that betray a full model (backbone + DINO head, possibly DDP-wrapped) passed where a backbone belongs.
_FULL_CHECKPOINT_PREFIXES = (
    "module.",
    "backbone.",
    "teacher.",
    "student.",
    "head.mlp.",
    "head.last_layer.",
    "mlp.",
    "last_layer.",
)
# Parameters of timm ViT variants the DINO ViT has no counterpart for.
_TIMM_ONLY_MARKERS = ("fc_norm.", ".ls1.", ".ls2.", "reg_token", "dist_token", "norm_pre.")


def load_strict(
    model: nn.Module, state: dict[str, torch.Tensor], origin: str, *, which: Which | None = None
) -> None:
    """``model.load_state_dict(state, strict=True)``, or a WeightsError that names every mismatch and
    suggests the likely cause (architecture, patch or image size, full checkpoint, student vs teacher)."""
    expected = model.state_dict()
    missing = _stems_first(set(expected) - set(state))
    unexpected = _stems_first(set(state) - set(expected))
    wrong = _stems_first(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        model.load_state_dict(state, strict=True)
        return
    hints = []
    found, wanted = _architecture_or_none(state), _architecture_or_none(expected)
    if found and wanted and found[:2] + found[3:] != wanted[:2] + wanted[3:]:
        hints.append(
            f"the file holds a {describe_architecture(*found)} but the model is a "
            f"{describe_architecture(*wanted)}: build the model with the file's architecture"
        )
    elif set(wrong) == {"pos_embed"}:
        hints.append(
            _pos_embed_problem(state)
            or "the file's position embeddings are for another image size: pass img_size=… to resample"
        )
    elif wrong:
        hints.append("the architecture differs (tiny/small/base/large, patch size or ResNet depth)")
    if any(k.startswith(_FULL_CHECKPOINT_PREFIXES) for k in unexpected):
        hints.append(
            "the file is a full training checkpoint (backbone + DINO head): load it with dino.hub.load, "
            "which takes the teacher's backbone"
        )
    if any(marker in k for k in unexpected for marker in _TIMM_ONLY_MARKERS):
        hints.append(
            "it is a timm ViT variant (average pooling, layer scale, registers or distillation token) that "
            "the DINO ViT does not have: only class-token ViTs with a final norm convert"
        )
    if missing and not unexpected and not wrong and not hints:
        hints.append("the file is incomplete or for another architecture")
    if which == "student":
        hints.append("you picked the student; the released backbones and evaluations use the teacher")
    parts = [
        f"missing {_short(missing)}" if missing else "",
        f"unexpected {_short(unexpected)}" if unexpected else "",
        "shape mismatch "
        + _short([f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong])
        if wrong
        else "",
    ]
    raise WeightsError(
        f"weights in {origin} do not match the model: "
        + "; ".join(p for p in parts if p)
        + (f". Likely cause: {'; or '.join(hints)}" if hints else "")
    )


def _stems_first(keys: Iterable[str]) -> list[str]:
    """Keys sorted with everything outside the repeated blocks first: those say most about a mismatch."""
    return sorted(
        keys,
        key=lambda k: (
            k.removeprefix("module.").removeprefix("backbone.").startswith(("blocks.", "layer")),
            k,
        ),
    )


def _architecture_or_none(state: dict[str, torch.Tensor]) -> tuple[str, int, int, int] | None:
    try:
        return infer_architecture(state)
    except WeightsError:
        return None


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --- Backbone weights from anything the user names --------------------------------------------------------


@dataclass(frozen=True)
class BackboneWeights:
    """Backbone tensors in the released key layout, with the architecture they belong to."""

    state: dict[str, torch.Tensor]
    arch: str
    patch_size: int  # 0 for convnets
    img_size: int  # the input size the position embeddings are stored for (224 for convnets)
    depth: int  # ViT blocks (0 for convnets)
    source: str
    which: Which | None = None  # set when taken from a full checkpoint


def read_backbone_weights(
    spec: str | Path,
    which: Which = "teacher",
    *,
    arch: str | None = None,
    patch_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
) -> BackboneWeights:
    """Backbone weights from a released name or file, a run directory, one of our checkpoints or exports
    (``.pth`` or ``.safetensors``), a released full checkpoint or a timm ViT state dict.

    The architecture comes from (in order) ``arch``/``patch_size``, the released name, our safetensors
    metadata or checkpoint config, and the tensor shapes. ``which`` picks the teacher or the student of a
    full checkpoint (ours or released) or run directory. A file holding a single backbone gives it for the
    default ``which="teacher"`` (released and run backbone files hold the teacher); ``which="student"`` is
    refused for it unless it is one of our safetensors exports of a student.
    """
    path = resolve_weights(spec, weights_dir, download)
    if path.is_dir():
        path = _run_weights(path, which)
    declared: tuple[str, int, int, int] | None = None
    from_full = False
    labelled: Which | None = None  # the backbone a single-backbone export of ours says it holds
    if is_safetensors(path):
        tensors, meta = read_safetensors(path)
        state = backbone_state_dict(tensors, which)
        if meta.get("format") == SAFETENSORS_FORMAT:
            declared = _declared_by_metadata(meta, path)
            labelled = meta["which"] if meta.get("which") in ("teacher", "student") else None
    else:
        obj = read_weights_file(path)
        state = backbone_state_dict(obj, which)
        from_full = isinstance(obj, dict) and ("teacher" in obj or "student" in obj)
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict):  # one of our training checkpoints
            declared = _declared_by_config(obj["config"])
    if which == "student" and not from_full and labelled != "student":
        raise WeightsError(_no_student_message(path))
    if str(spec) in RELEASES and declared is None:
        release = RELEASES[str(spec)]
        declared = (release.arch, release.patch_size, 0, 0)
    inferred = _architecture_or_none(state)
    pos_embed_grid(state)  # a position-embedding layout we cannot use is refused whatever declared the arch
    base = declared or inferred
    if base is None and arch is None:
        infer_architecture(state)  # raises the explanation
    arch_, patch, img, depth = base or (arch, patch_size or 16, 0, 0)
    if inferred is not None:  # what a name or config leaves open (0) comes from the tensor shapes
        img, depth = img or inferred[2], depth or inferred[3]
    if arch is not None and arch != arch_:
        arch_, depth = arch, inferred[3] if inferred is not None else 0
    patch = patch_size or patch
    if not arch_.startswith("vit_"):
        patch, depth = 0, 0
    details = [str(path)] if str(spec) != str(path) else []
    details += [which] if from_full else []
    source = f"{spec} ({', '.join(details)})" if details else str(spec)
    return BackboneWeights(state, arch_, patch, img or 224, depth, source, which if from_full else labelled)


def _no_student_message(path: Path) -> str:
    return (
        f"{path} holds one backbone and no student: a released backbone file, or a run's "
        "teacher_backbone.pth, is the teacher. Drop --which student (which='student') to use it, or give a "
        "full training checkpoint or a run directory with checkpoints/ to get the student"
    )


def _declared_by_metadata(meta: dict[str, str], path: Path) -> tuple[str, int, int, int]:
    try:
        version = int(meta.get("format_version", "0"))
        declared = meta["arch"], int(meta["patch_size"]), int(meta["img_size"]), int(meta["depth"])
    except (KeyError, ValueError) as err:
        raise WeightsError(f"{path}: incomplete dino metadata ({err}); re-export the file") from err
    if version > SAFETENSORS_FORMAT_VERSION:
        raise WeightsError(
            f"{path} was written by a newer dino (format_version {version}); upgrade dino to read it"
        )
    return declared


def _declared_by_config(config: dict[str, Any]) -> tuple[str, int, int, int] | None:
    model, data = config.get("model", {}), config.get("data", {})
    if not isinstance(model, dict) or "arch" not in model:
        return None
    return (
        str(model["arch"]),
        int(model.get("patch_size", 16)),
        int(data.get("global_crop_size", 0)) if isinstance(data, dict) else 0,
        int(model.get("depth", 0)),
    )


def check_img_size_applies(arch: str, img_size: int) -> None:
    """Refuse an ``img_size`` request for a backbone it means nothing to: it resamples the position
    embeddings of the DINO ViTs (``vit_*``); convolutional networks have none and take any input size."""
    from dino.models.backbones import is_resnet

    if arch.startswith("vit_"):
        return
    what = (
        "a convolutional network that has none and takes any input size"
        if is_resnet(arch.removeprefix("torchvision:"))
        else "not one of them"
    )
    raise WeightsError(
        f"img_size {img_size} applies only to ViT position embeddings (the vit_* architectures); {arch} is "
        f"{what}: drop img_size (--img-size)"
    )


def load_backbone_weights(model: nn.Module, path: str | Path, which: Which = "teacher") -> None:
    """Load backbone weights from ``path`` (any supported file, run directory or released name) into
    ``model`` strictly. ViT position embeddings are resampled to the model's input size if that differs."""
    from dino.models.vision_transformer import VisionTransformer

    weights = read_backbone_weights(path, which)
    state = weights.state
    if isinstance(model, VisionTransformer) and "pos_embed" in state:
        spec = model.spec
        if spec.patch_size == weights.patch_size and spec.img_size != weights.img_size:
            log.info(
                "resampling position embeddings of %s from %d to %d px", path, weights.img_size, spec.img_size
            )
            state = resize_pos_embed(state, spec.img_size)
    load_strict(model, state, weights.source, which=weights.which)


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation, with what defines it."""

    model: nn.Module
    arch: str  # vit_small, resnet50, …
    patch_size: int  # 0 for convnets
    embed_dim: int
    source: str  # where the weights came from ("random init" for baselines)
    depth: int = 0
    img_size: int = 224  # the input size it was trained at (ViTs: that of their position embeddings)


def load(
    name_or_path: str | Path,
    *,
    which: Which = "teacher",
    img_size: int | None = None,
    arch: str | None = None,
    patch_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """A backbone in eval mode from a released name (``dino_vits16``…), a file, a run directory, or
    ``torchvision:NAME`` (with ``random_init`` only).

    ``img_size`` resamples ViT position embeddings to another input size (bicubic). ``random_init`` builds
    the same architecture untrained (the baseline to report every number against).
    """
    from dino.models.backbones import build_backbone

    spec = str(name_or_path)
    if spec.startswith("torchvision:"):
        if img_size is not None:
            check_img_size_applies(spec, img_size)
        return _torchvision_backbone(spec.removeprefix("torchvision:"), random_init)
    weights = read_backbone_weights(
        spec, which, arch=arch, patch_size=patch_size, weights_dir=weights_dir, download=download
    )
    state, size = weights.state, weights.img_size
    if img_size is not None:
        check_img_size_applies(weights.arch, img_size)
        state, size = resize_pos_embed(state, img_size), img_size
    model, dim = build_backbone(weights.arch, weights.patch_size or 16, size, 0.0, weights.depth)
    if not random_init:
        load_strict(model, state, weights.source, which=weights.which)
    model.eval().to(device)
    source = "random init" if random_init else weights.source
    return LoadedBackbone(model, weights.arch, weights.patch_size, dim, source, weights.depth, size)


def load_backbone(
    spec: str | Path,
    which: Which = "teacher",
    random_init: bool = False,
    arch: str | None = None,
    patch_size: int | None = None,
    *,
    img_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedBackbone:
    """:func:`load` with the positional signature the evaluation commands use."""
    return load(
        spec,
        which=which,
        img_size=img_size,
        arch=arch,
        patch_size=patch_size,
        weights_dir=weights_dir,
        download=download,
        random_init=random_init,
        device=device,
    )


def _run_weights(run_dir: Path, which: Which) -> Path:
    from dino.train.checkpoint import CheckpointManager

    newest = CheckpointManager(run_dir).rolling()
    kept_teacher = (run_dir / "teacher_backbone.pth").is_file()
    if which == "teacher" and kept_teacher and not newest:
        return run_dir / "teacher_backbone.pth"
    if not newest and kept_teacher:
        raise WeightsError(
            f"{run_dir} kept only the teacher backbone (teacher_backbone.pth) and no training checkpoint: "
            "the student needs a checkpoint in checkpoints/. Drop --which student (which='student') to use "
            "the teacher, or point at a run that kept its checkpoints"
        )
    if not newest:
        raise WeightsError(
            f"{run_dir} has no checkpoints/ and no teacher_backbone.pth; is it a dino run directory?"
        )
    return newest[0]


def _torchvision_backbone(name: str, random_init: bool) -> LoadedBackbone:
    from dino.models.backbones import RESNETS, build_backbone

    if name not in RESNETS:
        raise WeightsError(f"torchvision backbone {name!r} is not supported; choose one of {RESNETS}")
    if not random_init:
        raise WeightsError(
            f"torchvision:{name} pretrained weights would be downloaded, which dino never does; save them "
            f"with torchvision yourself and pass the file, or add --random-init"
        )
    model, dim = build_backbone(name)
    model.eval()
    return LoadedBackbone(model, name, 0, dim, "random init")


# --- Training checkpoints (ours and the released full ones) -----------------------------------------------

# Released ``args`` field → (our config section, key).
_ARGS_TO_CONFIG: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "drop_path_rate": ("model", "drop_path_rate"),
        "norm_last_layer": ("head", "norm_last_layer"),
        "freeze_last_layer": ("head", "freeze_last_layer"),
        "warmup_teacher_temp": ("loss", "warmup_teacher_temp"),
        "teacher_temp": ("loss", "teacher_temp"),
        "warmup_teacher_temp_epochs": ("loss", "warmup_teacher_temp_epochs"),
        "momentum_teacher": ("teacher", "momentum"),
        "optimizer": ("optim", "name"),
        "lr": ("optim", "lr"),
        "min_lr": ("optim", "min_lr"),
        "warmup_epochs": ("optim", "warmup_epochs"),
        "weight_decay": ("optim", "weight_decay"),
        "weight_decay_end": ("optim", "weight_decay_end"),
        "clip_grad": ("optim", "clip_grad"),
        "global_crops_scale": ("data", "global_crops_scale"),
        "local_crops_scale": ("data", "local_crops_scale"),
        "local_crops_number": ("data", "local_crops_number"),
        "epochs": ("run", "epochs"),
        "batch_size_per_gpu": ("run", "batch_size"),
        "seed": ("run", "seed"),
    }
)


def load_training_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    weights_dir: str | Path | None = None,
    download: bool = False,
) -> dict[str, Any]:
    """A training checkpoint in our layout, from one of ours or a released full DINO checkpoint.

    Ours (a file, or a run directory's newest readable one) come back exactly as
    :func:`dino.train.checkpoint.load_checkpoint` returns them. A released full checkpoint (or a released
    name, which resolves to its ``*_full_checkpoint.pth``) comes back as ``format``, ``student`` and
    ``teacher`` (``backbone.*``/``head.*`` keys), ``dino_loss`` (``{"center": [1, K]}``), ``epoch`` (the
    next epoch to run), ``config`` (plain dict built from its ``args``, or None) and ``fp16_scaler`` when
    present; it has no ``optimizer``, ``rng``, ``iteration`` or ``step_in_epoch``.
    """
    from dino.train.checkpoint import CHECKPOINT_FORMAT, CheckpointManager

    resolved = resolve_weights(path, weights_dir, download, full=True)
    if resolved.is_dir():
        found = CheckpointManager(resolved).load_latest(map_location=map_location)
        if found is None:
            raise WeightsError(
                f"{resolved} has no readable checkpoint in checkpoints/; is it a dino run directory?"
            )
        return found[0]
    if is_safetensors(resolved):
        raise WeightsError(_backbone_only_message(resolved))
    obj = read_weights_file(resolved, map_location)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if not (
        isinstance(obj, dict)
        and isinstance(obj.get("student"), dict)
        and isinstance(obj.get("teacher"), dict)
    ):
        raise WeightsError(_backbone_only_message(resolved))
    return _convert_released_checkpoint(obj, str(resolved))


def _backbone_only_message(path: Path) -> str:
    return (
        f"{path} holds backbone weights only, not a training checkpoint (student, teacher, heads, center); "
        f"to start training from them, set model.pretrained={path} (a fresh head is trained)"
    )


def _convert_released_checkpoint(obj: dict[str, Any], origin: str) -> dict[str, Any]:
    from dino.train.checkpoint import CHECKPOINT_FORMAT

    student = _model_state(obj["student"], "student", origin)
    teacher = _model_state(obj["teacher"], "teacher", origin)
    if set(student) != set(teacher):
        raise WeightsError(
            f"{origin}: student and teacher keys differ ({_short(sorted(set(student) ^ set(teacher)))}); "
            "the checkpoint is damaged or not from DINO"
        )
    loss = obj.get("dino_loss")
    center = loss.get("center") if isinstance(loss, dict) else None
    if not isinstance(center, torch.Tensor):
        raise WeightsError(f"{origin} has no dino_loss center; it is not a full DINO training checkpoint")
    converted: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "student": student,
        "teacher": teacher,
        "dino_loss": {"center": center},
        "epoch": int(obj.get("epoch", 0)),
        "config": config_from_released_args(obj.get("args"), teacher),
    }
    if isinstance(obj.get("fp16_scaler"), dict):
        converted["fp16_scaler"] = obj["fp16_scaler"]
    return converted


def config_from_released_args(args: Any, model_state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Our config (plain dict) for a released full checkpoint: shapes from ``model_state``
    (``backbone.*``/``head.*``), training settings from its ``args`` (Namespace or dict); None if impossible.

    The data path and precision are not carried over (they belong to the machine that trained it).
    """
    from dino.train.config import ConfigError, config_from_dict, config_to_dict

    fields = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(fields, dict):
        return None
    backbone = {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("head."): v for k, v in model_state.items() if k.startswith("head.")}
    try:
        arch, patch, img, depth = infer_architecture(backbone)
    except WeightsError as err:
        log.warning("cannot rebuild the config of this checkpoint: %s", err)
        return None
    from dino.models.vision_transformer import VIT_SIZES

    standard_depth = VIT_SIZES[arch.removeprefix("vit_")][1] if arch.startswith("vit_") else 0
    linears = sorted(
        (k for k, v in head.items() if k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 2),
        key=lambda k: int(k.split(".")[1]) if k.count(".") == 2 else 0,
    )
    if "last_layer.weight_v" not in head or not linears:
        return None
    data: dict[str, dict[str, Any]] = {
        "model": {"arch": arch, "patch_size": patch or 16, "depth": 0 if depth == standard_depth else depth},
        "head": {
            "out_dim": int(head["last_layer.weight_v"].shape[0]),
            "bottleneck_dim": int(head["last_layer.weight_v"].shape[1]),
            "hidden_dim": int(head[linears[0]].shape[0]) if len(linears) > 1 else 2048,
            "nlayers": len(linears),
            "use_bn": any(k.endswith("running_mean") for k in head),
        },
        "data": {"global_crop_size": img},
    }
    for name, (section, key) in _ARGS_TO_CONFIG.items():
        value = fields.get(name)
        if value is None:
            continue
        data.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    try:
        return config_to_dict(config_from_dict(data))
    except ConfigError as err:
        log.warning("cannot rebuild the config of this checkpoint: %s", err)
        return None


# --- Command-line options shared by every command that loads weights --------------------------------------


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
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
