"""Loading backbone weights safely from our runs, our exports and the released DINO files.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint that carries code is refused, never
executed. Keys are normalised (``module.`` / ``backbone.`` prefixes, the ``teacher``/``student`` entry of a
full checkpoint) and loaded strictly; a mismatch is an error that names the keys and the likely cause.
"""

from __future__ import annotations

import argparse
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Which = Literal["teacher", "student"]


class WeightsError(ValueError):
    """Weights that cannot be loaded as asked; the message says why and what to do."""


def read_weights_file(path: str | Path) -> Any:
    """Load a ``.pth`` file without executing code (``argparse.Namespace`` is the one object allowed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refused to load {path}: it contains Python objects other than tensors and plain data "
            f"({str(err).splitlines()[0]}); only load files you trust, and re-save them as plain state dicts"
        ) from err
    except Exception as err:
        raise WeightsError(
            f"cannot read {path} as a PyTorch weights file ({type(err).__name__}: {err})"
        ) from err


def backbone_state_dict(obj: Any, which: Which = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's tensors from a backbone-only state dict or a full training checkpoint."""
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        raise WeightsError(f"this checkpoint has no {which!r} entry; pick the other with which=…")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            "the file holds no state dict of tensors (neither a backbone nor a training checkpoint)"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_backbone_weights(model: nn.Module, path: str | Path, which: Which = "teacher") -> None:
    """Load backbone weights from ``path`` into ``model`` strictly, with an actionable error on mismatch."""
    state = backbone_state_dict(read_weights_file(path), which)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    load_strict(model, state, str(path))


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        model.load_state_dict(state, strict=True)
        return
    hints = []
    if any(k.startswith(("pos_embed", "patch_embed")) for k in (w.split(":")[0] for w in wrong_shape)):
        hints.append("the patch size or image size differs from the file's (e.g. vit_small/16 vs /8)")
    if wrong_shape:
        hints.append("the architecture differs (tiny/small/base/large or resnet depth)")
    if any(k.startswith(("head.", "last_layer", "mlp.")) for k in unexpected):
        hints.append("the file is a full model with its projection head; load the backbone only")
    if missing and not unexpected and not wrong_shape:
        hints.append("the file is incomplete or for another architecture")
    raise WeightsError(
        f"weights in {origin} do not match the model: "
        + "; ".join(
            part
            for part in (
                f"missing {_short(missing)}" if missing else "",
                f"unexpected {_short(unexpected)}" if unexpected else "",
                f"shape mismatch {_short(wrong_shape)}" if wrong_shape else "",
            )
            if part
        )
        + (f". Likely cause: {' or '.join(hints)}" if hints else "")
    )


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --- Building a backbone from whatever the user names -------------------------------------------------


@dataclass
class LoadedBackbone:
    """A backbone ready for evaluation, with what defines it."""

    model: nn.Module
    arch: str  # vit_small, resnet50, …
    patch_size: int  # 0 for convnets
    embed_dim: int
    source: str  # where the weights came from ("random init" for baselines)
    depth: int = 0


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
            raise WeightsError(f"ViT width {dim} is not one of {sorted(_HEADS_BY_DIM)} (tiny/small/base/large)")
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = int(math.isqrt(int(state["pos_embed"].shape[1]) - 1))
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return f"vit_{_HEADS_BY_DIM[dim]}", patch, grid * patch, depth
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        name = _RESNET_BLOCKS.get((*blocks, bottleneck))
        if bottleneck and blocks == (3, 4, 6, 3) and state["layer1.0.conv1.weight"].shape[0] == 128:
            name = "wide_resnet50_2"
        if name is None:
            raise WeightsError(f"unrecognised ResNet layout {blocks} (bottleneck={bottleneck})")
        return name, 0, 224, 0
    raise WeightsError("cannot tell the architecture from these weights (neither a ViT nor a torchvision ResNet)")


def load_backbone(
    spec: str | Path,
    which: Which = "teacher",
    random_init: bool = False,
    arch: str | None = None,
    patch_size: int | None = None,
) -> LoadedBackbone:
    """A backbone from a run directory, one of our checkpoints, a backbone weights file, or ``torchvision:NAME``.

    The architecture is read from the checkpoint's config or from the tensor shapes. ``random_init`` builds
    the same architecture untrained (the baseline to report every number against).
    """
    from dino.models.backbones import build_backbone

    spec = str(spec)
    if spec.startswith("torchvision:"):
        return _torchvision_backbone(spec.removeprefix("torchvision:"), random_init)
    path = Path(spec).expanduser()
    depth = 0
    if path.is_dir():
        path = _run_weights(path, which)
    obj = read_weights_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):  # one of our training checkpoints
        from dino.train.config import config_from_dict

        cfg = config_from_dict(obj["config"])
        arch_, patch, img, depth = cfg.model.arch, cfg.model.patch_size, cfg.data.global_crop_size, cfg.model.depth
    else:
        arch_, patch, img, depth = infer_architecture(backbone_state_dict(obj, which))
    arch_, patch = arch or arch_, patch_size or patch
    model, dim = build_backbone(arch_, patch, img, 0.0, depth)
    source = "random init" if random_init else f"{path} ({which})" if "teacher" in obj or "student" in obj else str(path)
    if not random_init:
        state = backbone_state_dict(obj, which)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
        load_strict(model, state, str(path))
    model.eval()
    return LoadedBackbone(model, arch_, patch if arch_.startswith("vit_") else 0, dim, source, depth)


def _run_weights(run_dir: Path, which: Which) -> Path:
    from dino.train.checkpoint import CheckpointManager

    if which == "teacher" and (run_dir / "teacher_backbone.pth").is_file() and not CheckpointManager(run_dir).rolling():
        return run_dir / "teacher_backbone.pth"
    newest = CheckpointManager(run_dir).rolling()
    if not newest:
        raise WeightsError(f"{run_dir} has no checkpoints/ and no teacher_backbone.pth; is it a dino run directory?")
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
