"""A fine-tuned classifier (backbone + head) out to timm: a state dict that loads strictly into
``timm.create_model(name, num_classes=N)`` and gives the same logits.

The DINO ViT's keys are timm's own (:mod:`dino.hub.export`); the head is timm's ``head`` for a ViT and
``fc`` for a torchvision ResNet. The file is written atomically, read back and loaded into timm before it
is reported as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dino.checkpoint import CheckpointManager, atomic_save
from dino.hub import WeightsError, read_weights_file
from dino.hub.export import timm_model_args, to_timm_state_dict
from dino.hub.weights import BackboneWeights
from dino.models.backbones import SMALL_STEM_SUFFIX


@dataclass(frozen=True)
class ExportedClassifier:
    path: Path
    timm_name: str
    timm_kwargs: dict[str, Any]
    num_classes: int
    load_hint: str


def is_finetune_source(source: str | Path) -> bool:
    """Whether ``source`` is a fine-tuning run directory, its ``classifier.pth`` or one of its checkpoints."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (path / "classifier.pth").is_file() or _is_finetune_file(
            next(iter(CheckpointManager(path).rolling()), None)
        )
    return _is_finetune_file(path)


def _is_finetune_file(path: Path | None) -> bool:
    if path is None or not path.is_file() or path.suffix != ".pth":
        return False
    try:
        obj = read_weights_file(path)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("kind") in ("classifier", "finetune")


def read_classifier(source: str | Path) -> tuple[dict[str, Any], Path]:
    """The fine-tuned weights and their description (``model``, ``backbone``, ``classes``) from a run
    directory (``classifier.pth``, else its newest checkpoint), ``classifier.pth`` or a checkpoint."""
    path = Path(source).expanduser()
    if path.is_dir():
        final = path / "classifier.pth"
        newest = next(iter(CheckpointManager(path).rolling()), None)
        chosen = final if final.is_file() else newest
        if chosen is None:
            raise WeightsError(f"{path} holds no classifier.pth and no checkpoint: is it a fine-tuning run?")
        path = chosen
    obj = read_weights_file(path)
    if not (isinstance(obj, dict) and obj.get("kind") in ("classifier", "finetune")):
        raise WeightsError(
            f"{path} is not a fine-tuned classifier (classifier.pth or a fine-tuning checkpoint)"
        )
    return obj, path


def classifier_timm_state(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """(state dict, timm model name, keyword arguments) of a fine-tuned classifier."""
    spec = obj["backbone"]
    arch = str(spec["arch"])
    if arch.endswith(SMALL_STEM_SUFFIX):
        raise WeightsError(
            f"{arch} has a 3×3 stride-1 stem that no timm ResNet builds; its weights are in classifier.pth"
        )
    model = obj["model"]
    backbone = {
        k.removeprefix("backbone."): v.detach().cpu().contiguous()
        for k, v in model.items()
        if k.startswith("backbone.")
    }
    weights = BackboneWeights(
        backbone, arch, int(spec["patch_size"]), int(spec["img_size"]), int(spec["depth"]), "fine-tuned"
    )
    name, kwargs = timm_model_args(weights)
    state = to_timm_state_dict(weights)
    head = "head" if arch.startswith("vit_") else "fc"
    state[f"{head}.weight"] = model["head.weight"].detach().cpu().contiguous()
    state[f"{head}.bias"] = model["head.bias"].detach().cpu().contiguous()
    kwargs = {**kwargs, "num_classes": int(model["head.weight"].shape[0])}
    return state, name, kwargs


def export_classifier(
    source: str | Path, output: str | Path | None = None, overwrite: bool = False
) -> ExportedClassifier:
    """Write the fine-tuned classifier of ``source`` for timm (default: ``<run>/export/classifier_timm.pth``
    or ``<file stem>_timm.pth`` beside a file), verified by loading it into timm strictly."""
    obj, path = read_classifier(source)
    state, name, kwargs = classifier_timm_state(obj)
    src = Path(source).expanduser()
    target = (
        src / "export" / "classifier_timm.pth" if src.is_dir() else path.with_name(f"{path.stem}_timm.pth")
    )
    if output is not None:
        chosen = Path(output).expanduser()
        target = chosen / target.name if chosen.is_dir() else chosen
    if target.exists() and not overwrite:
        raise WeightsError(f"{target} exists; pass --force to replace it or choose another --output")
    atomic_save(state, target)
    back = torch.load(target, map_location="cpu", weights_only=True)
    if set(back) != set(state) or not all(torch.equal(back[k], v) for k, v in state.items()):
        raise WeightsError(f"{target} does not read back identically; the disk may be full or failing")
    _verify_timm(back, name, kwargs)
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    hint = f"timm.create_model({name!r}, pretrained=False{args}).load_state_dict(torch.load({str(target)!r}), strict=True)"
    return ExportedClassifier(target, name, kwargs, kwargs["num_classes"], hint)


def _verify_timm(state: dict[str, torch.Tensor], name: str, kwargs: dict[str, Any]) -> None:
    try:
        import timm
    except ImportError:  # pragma: no cover - depends on the environment
        return
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"the export does not load into timm's {name}({kwargs}): {err}") from err
