"""A backbone (teacher by default) out to the formats people already use (``dino export``).

- ``dino``: a plain state dict in the released DINO key layout, so the original ``vision_transformer.py``
  (or torchvision's ResNet without ``fc``) and everything built for it load it with ``strict=True``;
- ``safetensors``: the same tensors in a file that cannot carry code, with the architecture in its metadata;
- ``timm``: a state dict that loads strictly into the matching ``timm`` model created with
  ``num_classes=0`` (class-token pooling, LayerNorm eps 1e-6: the DINO ViT is timm's plain ViT); the
  released shapes map to timm's own DINO names (``vit_small_patch16_224.dino``, ``vit_small_patch8_224.dino``,
  ``vit_base_patch16_224.dino``, ``vit_base_patch8_224.dino``), whose configuration has no classifier, so
  ``timm.create_model(name, pretrained=False)`` alone takes the export. timm has no DINO ResNet-50 name:
  ``resnet50`` with ``num_classes=0``.

Every export is read back and compared tensor by tensor before it is reported as written.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dino.checkpoint import atomic_save, is_sharded_checkpoint
from dino.hub.errors import WeightsError, Which
from dino.hub.files import SAFETENSORS_FORMAT, SAFETENSORS_FORMAT_VERSION
from dino.hub.releases import resolve_weights
from dino.hub.weights import BackboneWeights, read_backbone_weights
from dino.models.backbones import SMALL_STEM_SUFFIX, narrow_resnet_layout
from dino.models.vision_transformer import VIT_SIZES

ExportFormat = Literal["dino", "safetensors", "timm"]
EXPORT_FORMATS: tuple[str, ...] = ("dino", "safetensors", "timm")
_SUFFIXES = {
    "dino": ".pth",
    "safetensors": ".safetensors",
    "timm": "_timm.pth",
    "onnx": ".onnx",
    "pt2": ".pt2",
}
# timm model names for the DINO ViTs; other patch sizes use the /16 name with a patch_size override.
_TIMM_VITS = frozenset(
    {
        ("vit_tiny", 16),
        ("vit_small", 16),
        ("vit_small", 8),
        ("vit_base", 16),
        ("vit_base", 8),
        ("vit_large", 16),
    }
)


# The released DINO ViTs, which timm names ``<arch>_patch<p>_224.dino`` (timm 0.9 and later).
_DINO_RELEASED_VITS = frozenset({("vit_small", 16), ("vit_small", 8), ("vit_base", 16), ("vit_base", 8)})


@dataclass(frozen=True)
class Exported:
    """What was written, and how to load it."""

    path: Path
    format: str
    weights: BackboneWeights
    load_hint: str


def safetensors_metadata(weights: BackboneWeights) -> dict[str, str]:
    """The architecture of ``weights`` as safetensors metadata (string values), read back by ``dino.hub``."""
    return {
        "format": SAFETENSORS_FORMAT,
        "format_version": str(SAFETENSORS_FORMAT_VERSION),
        "arch": weights.arch,
        "patch_size": str(weights.patch_size),
        "img_size": str(weights.img_size),
        "depth": str(weights.depth),
        "embed_dim": str(_embed_dim(weights)),
        "layout": "dino",  # key names as in the released DINO files
        "which": weights.which or "",
    }


def _embed_dim(weights: BackboneWeights) -> int:
    if "cls_token" in weights.state:
        return int(weights.state["cls_token"].shape[-1])
    if "layer4.0.conv1.weight" in weights.state:  # torchvision ResNet: width of layer4's output
        last = max(k for k in weights.state if k.startswith("layer4.") and k.endswith(".weight"))
        return int(weights.state[last].shape[0])
    return 0


def timm_model_args(weights: BackboneWeights) -> tuple[str, dict[str, Any]]:
    """The ``timm.create_model`` name and keyword arguments whose state dict matches ``weights``."""
    arch = weights.arch
    if arch.startswith("timm:"):
        return arch.removeprefix("timm:"), {"num_classes": 0}
    if arch.endswith(SMALL_STEM_SUFFIX):
        raise WeightsError(
            f"{arch} has a 3×3 stride-1 stem that no timm ResNet builds; export it as pth or safetensors"
        )
    if not arch.startswith("vit_"):
        return arch, {"num_classes": 0}
    if arch == "vit_giant":
        raise WeightsError(
            "vit_giant has DINOv2's ViT-g/14 dimensions with a plain MLP, a layout no timm ViT builds "
            "(timm's ViT-g is 1408 wide, its DINOv2 one has a SwiGLU MLP); export it as pth or safetensors"
        )
    standard_depth = not weights.depth or weights.depth == VIT_SIZES[arch.removeprefix("vit_")][1]
    if (arch, weights.patch_size) in _DINO_RELEASED_VITS and standard_depth:
        # timm's own name for the released DINO model: its configuration has no classifier already
        name = f"{arch}_patch{weights.patch_size}_224.dino"
        return name, ({"img_size": weights.img_size} if weights.img_size != 224 else {})
    name_patch = weights.patch_size if (arch, weights.patch_size) in _TIMM_VITS else 16
    kwargs: dict[str, Any] = {"num_classes": 0}
    if name_patch != weights.patch_size:
        kwargs["patch_size"] = weights.patch_size
    if weights.img_size != 224:
        kwargs["img_size"] = weights.img_size
    if weights.depth and weights.depth != VIT_SIZES[arch.removeprefix("vit_")][1]:
        kwargs["depth"] = weights.depth
    return f"{arch}_patch{name_patch}_224", kwargs


def to_timm_state_dict(weights: BackboneWeights) -> dict[str, torch.Tensor]:
    """``weights`` renamed for timm. The DINO ViT and ResNet key layouts are timm's own (``norm`` is the
    final norm of token pooling, there is no ``fc_norm``; the classifier ``head``/``fc`` is absent because
    the model is created with ``num_classes=0``), so this checks the layout rather than renaming."""
    timm_model_args(weights)  # refuses architectures timm does not build
    state = weights.state
    if weights.arch.startswith("vit_"):
        stray = sorted(
            k
            for k in state
            if k not in ("cls_token", "pos_embed")
            and not k.startswith(("patch_embed.proj.", "blocks.", "norm."))
        )
        if stray:
            raise WeightsError(f"keys {stray[:6]} have no counterpart in timm's VisionTransformer")
    return dict(state)


def default_output(source: Path, fmt: str, which: Which) -> Path:
    """``<run>/export/<which>_backbone<suffix>`` for a run, ``<file stem>_<which><suffix>`` beside a file (or
    a sharded checkpoint's directory)."""
    suffix = _SUFFIXES[fmt]
    if source.is_dir() and not is_sharded_checkpoint(source):
        return source / "export" / f"{which}_backbone{suffix}"
    return source.with_name(f"{source.stem}_{which}{suffix}")


def export_target(
    source: str | Path,
    fmt: str,
    output: str | Path | None,
    which: Which,
    weights_dir: str | Path | None,
    download: bool,
    overwrite: bool,
) -> Path:
    """The file an export of ``source`` as ``fmt`` goes to: ``output`` (a file, or an existing folder to
    put the default name in) or :func:`default_output`; refused when it is the source itself, or exists
    and ``overwrite`` is off."""
    resolved = resolve_weights(source, weights_dir, download)
    target = default_output(resolved, fmt, which)
    if output is not None:
        chosen = Path(output).expanduser()
        target = chosen / target.name if chosen.is_dir() else chosen
    if target.exists() and target.resolve() == resolved.resolve():
        raise WeightsError(f"the output {target} is the source itself; choose another --output")
    if target.exists() and not overwrite:
        raise WeightsError(f"{target} exists; pass --force to replace it or choose another --output")
    return target


def export_backbone(
    source: str | Path,
    fmt: ExportFormat = "dino",
    output: str | Path | None = None,
    *,
    which: Which = "teacher",
    img_size: int | None = None,
    weights_dir: str | Path | None = None,
    download: bool = False,
    overwrite: bool = False,
) -> Exported:
    """Write the ``which`` backbone of ``source`` (anything :func:`dino.hub.load` accepts) as ``fmt``.

    ``output`` is the file to write, or an existing folder to write the default file name
    (:func:`default_output`) into; by default the file goes beside the source (or into ``<run>/export/``).
    ``which="student"`` needs a full training checkpoint or a run directory: a backbone-only file holds the
    teacher alone. ``img_size`` resamples ViT position embeddings first (e.g. 224 for tools that build the
    model at 224 px); it does not apply to convolutional networks. The file is written atomically and
    verified by reading it back.
    """
    if fmt not in EXPORT_FORMATS:
        raise WeightsError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    target = export_target(source, fmt, output, which, weights_dir, download, overwrite)
    weights = read_backbone_weights(source, which, weights_dir=weights_dir)
    if img_size is not None:
        weights = weights.resampled(img_size)
    weights = replace(weights, state={k: v.detach().cpu().contiguous() for k, v in weights.state.items()})
    state = to_timm_state_dict(weights) if fmt == "timm" else weights.state
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        write_safetensors(state, target, safetensors_metadata(weights))
    else:
        atomic_save(state, target)
    _verify(target, state, weights)
    if fmt == "timm":
        _verify_timm(state, weights)
    return Exported(target, fmt, weights, _load_hint(target, fmt, weights))


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Save ``state`` with ``metadata`` as safetensors, atomically (a temporary file renamed into place),
    with the permissions of any new file (0666 less the umask), as the ``.pth`` exports get."""
    try:
        from safetensors.torch import save_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise WeightsError(
            "the safetensors format needs safetensors: pip install 'dino[safetensors]'"
        ) from err
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # safetensors writes through a private (0600) temporary file of its own: the mode an empty file
        # created here gets is the one a normal file would have, read without touching the process umask.
        tmp.touch()
        mode = stat.S_IMODE(tmp.stat().st_mode)
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _verify(path: Path, state: dict[str, torch.Tensor], weights: BackboneWeights) -> None:
    back = read_backbone_weights(path, arch=weights.arch, patch_size=weights.patch_size or None)
    same = set(back.state) == set(state) and all(torch.equal(back.state[k], v) for k, v in state.items())
    if not same:
        raise WeightsError(f"{path} does not read back identically; the disk may be full or failing")


def _verify_timm(state: dict[str, torch.Tensor], weights: BackboneWeights) -> None:
    """Load into the matching timm model (built untrained, never downloaded) when timm is installed."""
    try:
        import timm
    except ImportError:
        return
    name, kwargs = timm_model_args(weights)
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"the export does not load into timm's {name}({kwargs}): {err}") from err


def _load_hint(path: Path, fmt: str, weights: BackboneWeights) -> str:
    if fmt == "timm":
        name, kwargs = timm_model_args(weights)
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())  # none for timm's own DINO names
        return f"timm.create_model({name!r}, pretrained=False{args}).load_state_dict(torch.load({str(path)!r}), strict=True)"
    if fmt == "safetensors":
        return (
            f"dino.hub.load({str(path)!r}).model  # the nn.Module; dino.hub.load returns a LoadedBackbone "
            "(.model, .arch, .patch_size, .embed_dim, .img_size); or safetensors.torch.load_file(...) for the bare "
            "tensors, the architecture in the metadata (arch, patch_size, img_size, depth)"
        )
    layout = narrow_resnet_layout(weights.arch)
    if layout is not None:  # no torchvision builder: torchvision's ResNet class with our layout
        blocks, width = layout
        if width != 64:
            return f"dino.hub.load({str(path)!r}).model  # {weights.arch}: a ResNet narrower than torchvision builds"
        return (
            f"from torchvision.models.resnet import ResNet, BasicBlock; m = ResNet(BasicBlock, {list(blocks)}); "
            "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity(); "
            f"m.fc = torch.nn.Identity(); m.load_state_dict(torch.load({str(path)!r}), strict=True)"
        )
    if not weights.arch.startswith("vit_"):
        stem = ""
        if weights.arch.endswith(SMALL_STEM_SUFFIX):
            width = int(weights.state["conv1.weight"].shape[0])
            stem = f"m.conv1 = torch.nn.Conv2d(3, {width}, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity(); "
        return (
            f"m = torchvision.models.{weights.arch.removesuffix(SMALL_STEM_SUFFIX)}(); {stem}"
            f"m.fc = torch.nn.Identity(); m.load_state_dict(torch.load({str(path)!r}), strict=True)"
        )
    dim, depth, heads = VIT_SIZES[weights.arch.removeprefix("vit_")]
    img = f", img_size=[{weights.img_size}]" if weights.img_size != 224 else ""
    # The original code builds vit_tiny / vit_small / vit_base by name; the others by their dimensions.
    if (weights.depth and weights.depth != depth) or weights.arch not in (
        "vit_tiny",
        "vit_small",
        "vit_base",
    ):
        build = (
            f"vision_transformer.VisionTransformer(patch_size={weights.patch_size}, embed_dim={dim}, "
            f"depth={weights.depth or depth}, num_heads={heads}, mlp_ratio=4, qkv_bias=True, "
            f"norm_layer=partial(nn.LayerNorm, eps=1e-6){img})"
        )
    else:
        build = f"vision_transformer.{weights.arch}(patch_size={weights.patch_size}{img})"
    hint = f"original DINO code: {build}.load_state_dict(torch.load({str(path)!r}), strict=True)"
    if weights.img_size != 224:
        hint += (
            f"\nnote: position embeddings are stored for {weights.img_size} px inputs; tools that build the "
            "model at 224 px need a re-export with --img-size 224"
        )
    return hint
