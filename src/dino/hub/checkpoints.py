"""Training checkpoints: ours (files and run directories) and the released full ones of the original code.

A released full checkpoint is converted to our layout (``backbone.*``/``head.*`` keys, the loss center,
the next epoch, its optimiser state keyed by parameter name and a config rebuilt from its ``args``), so
training can resume from it as the original would. :func:`training_image_settings` reads what a run's model
saw in training (crop size, normalisation), for the evaluations to default to it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml

from dino.checkpoint import CHECKPOINT_FORMAT, SHARDED_EXTRA, CheckpointManager, is_sharded_checkpoint
from dino.config import ConfigError, config_from_dict, config_to_dict
from dino.hub.errors import WeightsError, short_list
from dino.hub.files import is_safetensors, read_weights_file
from dino.hub.releases import resolve_weights
from dino.hub.state import infer_architecture, released_model_state
from dino.models.vision_transformer import VIT_SIZES

log = logging.getLogger("dino.hub")  # the package's logger: log records keep the name they always had


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
    :func:`dino.checkpoint.load_checkpoint` returns them. A released full checkpoint (or a released
    name, which resolves to its ``*_full_checkpoint.pth``) comes back as ``format``, ``student`` and
    ``teacher`` (``backbone.*``/``head.*`` keys), ``dino_loss`` (``{"center": [1, K]}``), ``epoch`` (the
    next epoch to run), ``config`` (plain dict built from its ``args``, or None), ``fp16_scaler`` when
    present and ``released_optimizer`` (see :func:`released_optimizer_state`) when its optimiser state
    matches its student; it has no ``optimizer``, ``rng``, ``iteration`` or ``step_in_epoch``.
    """
    resolved = resolve_weights(path, weights_dir, download, full=True)
    if resolved.is_dir() and not is_sharded_checkpoint(resolved):
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
    student = released_model_state(obj["student"], "student", origin)
    teacher = released_model_state(obj["teacher"], "teacher", origin)
    if set(student) != set(teacher):
        raise WeightsError(
            f"{origin}: student and teacher keys differ ({short_list(sorted(set(student) ^ set(teacher)))}); "
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
    optimizer = released_optimizer_state(obj, student, origin)
    if optimizer is not None:
        converted["released_optimizer"] = optimizer
    return converted


def released_checkpoint_config(
    path: str | Path, *, weights_dir: str | Path | None = None, download: bool = False
) -> dict[str, Any] | None:
    """The config (plain dict) that a released full checkpoint's ``args`` and tensor shapes give, for
    ``dino train --resume`` to start from; None for anything else (our checkpoints and run directories,
    backbone files). The tensors are mapped from the file, not read (a ViT-B checkpoint is gigabytes)."""
    resolved = resolve_weights(path, weights_dir, download, full=True)
    if resolved.is_dir() or is_safetensors(resolved):
        return None
    obj = read_weights_file(resolved, "cpu", mmap=True)
    if not isinstance(obj, dict) or obj.get("format") == CHECKPOINT_FORMAT:
        return None
    if not (isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict)):
        return None
    return config_from_released_args(
        obj.get("args"), released_model_state(obj["teacher"], "teacher", str(resolved))
    )


# Buffers (not parameters, so not in the optimiser) that a DINO student can hold: BatchNorm statistics.
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


_FRESH_OPTIMISER = (
    "training goes on with a fresh optimiser state (its first updates differ from the original's)"
)


def released_optimizer_state(
    obj: dict[str, Any], student: dict[str, torch.Tensor], origin: str
) -> dict[str, Any] | None:
    """The original's optimiser state of a released full checkpoint, keyed by parameter name:
    ``{"name": "adamw" | "sgd" | "lars", "state": {"backbone.…" / "head.…": {"exp_avg": …, …}}}``;
    None (with a warning) when it cannot be matched to the student's parameters.

    ``main_dino.py`` saves ``optimizer.state_dict()``, whose state is keyed by position: its parameter
    groups walk the student's trainable parameters in registration order (the order of its state dict,
    ``student``, without the BatchNorm buffers) into the weights that get weight decay, then the biases
    and 1-D parameters that do not; with ``norm_last_layer`` the head's ``weight_g`` is frozen and not in
    the optimiser. Our head registers ``weight_v`` before ``weight_g``, the reverse of the original's, so
    the state is handed over by name, never by position.
    """
    saved = obj.get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return None
    args = obj.get("args")
    fields = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    decay, no_decay = _released_parameter_groups(student, fields)
    groups = saved.get("param_groups")
    sizes = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else None
    if not isinstance(groups, list) or sizes != [len(decay), len(no_decay)]:
        log.warning(
            "%s: the optimiser's parameter groups hold %s parameters, not the %d weights and the %d biases "
            "and 1-D parameters its student trains; %s",
            origin, sizes, len(decay), len(no_decay), _FRESH_OPTIMISER,
        )  # fmt: skip
        return None
    state: dict[str, dict[str, Any]] = {}
    for group, names in zip(groups, (decay, no_decay), strict=True):
        for index, name in zip(group["params"], names, strict=True):
            entry = saved["state"].get(index)
            if entry is None:  # never updated (the last layer during its frozen first epochs)
                continue
            converted = _parameter_state(entry, index, name, student[name], origin)
            if converted is None:
                return None
            state[name] = converted
    return {"name": str(fields.get("optimizer", "adamw")), "state": state}


def _released_parameter_groups(
    student: dict[str, torch.Tensor], fields: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """The names of the original's two parameter groups, in its order: the weights that get weight decay,
    then the biases and 1-D parameters that do not."""
    frozen = {"head.last_layer.weight_g"} if fields.get("norm_last_layer", True) else set()
    trainable = [k for k in student if not k.endswith(_BUFFER_SUFFIXES) and k not in frozen]
    no_decay = [k for k in trainable if k.endswith(".bias") or student[k].ndim == 1]
    decay = [k for k in trainable if k not in set(no_decay)]
    return decay, no_decay


def _parameter_state(
    entry: dict[str, Any], index: int, name: str, parameter: torch.Tensor, origin: str
) -> dict[str, Any] | None:
    """One parameter's saved optimiser state, ready for ours; None (with a warning) when its shapes differ."""
    wrong = [
        k
        for k, v in entry.items()
        if k != "step" and isinstance(v, torch.Tensor) and v.shape != parameter.shape
    ]
    if wrong:
        log.warning(
            "%s: the optimiser's %s for parameter %d has shape %s, not that of %s %s; %s",
            origin, wrong[0], index, tuple(entry[wrong[0]].shape), name,
            tuple(parameter.shape), _FRESH_OPTIMISER,
        )  # fmt: skip
        return None
    # Old PyTorch (the released files) kept Adam's step count as a Python number; PyTorch's
    # fused AdamW needs a float32 tensor.
    return {
        k: torch.tensor(float(v), dtype=torch.float32) if k == "step" and not torch.is_tensor(v) else v
        for k, v in entry.items()
    }


def config_from_released_args(args: Any, model_state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Our config (plain dict) for a released full checkpoint: shapes from ``model_state``
    (``backbone.*``/``head.*``), training settings from its ``args`` (Namespace or dict); None if impossible.

    The data path and precision are not carried over (they belong to the machine that trained it).
    """
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


# --- What a run's model saw in training -------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingImageSettings:
    """What the model saw during training, when its files say so (None where unknown)."""

    crop_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def training_image_settings(weights: str | Path | None) -> TrainingImageSettings:
    """Crop size and normalisation from the training config stored with ``weights``, when there is one.

    A run directory holds ``config.yaml``; our training checkpoints hold the config as a dict. Backbone-only
    files carry none (their crop size is still known from the model).
    """
    if not weights or str(weights).startswith("torchvision:"):
        return TrainingImageSettings()
    path = Path(weights).expanduser()
    data: Mapping[str, Any] | None = None
    if path.is_dir() and (path / "config.yaml").is_file():
        raw = yaml.safe_load((path / "config.yaml").read_text())
        data = raw.get("data") if isinstance(raw, dict) else None
    elif path.is_file():
        data = _checkpoint_data_config(path)
    elif is_sharded_checkpoint(path):
        data = _checkpoint_data_config(path / SHARDED_EXTRA)
    if not isinstance(data, Mapping):
        return TrainingImageSettings()
    crop = data.get("global_crop_size")
    mean, std = data.get("mean"), data.get("std")
    return TrainingImageSettings(
        int(crop) if crop else None,
        _per_channel(mean),
        _per_channel(std),
    )


def _per_channel(values: Any) -> tuple[float, float, float] | None:
    """Three numbers (one per RGB channel) as floats; None for anything else."""
    if not values or len(values) != 3:
        return None
    r, g, b = (float(v) for v in values)
    return r, g, b


def _checkpoint_data_config(path: Path) -> Mapping[str, Any] | None:
    """The ``data`` section of one of our checkpoints, read lazily (memory-mapped), or None."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours, legacy format or refused: no stored settings, the loader reports problems
        return None
    config = obj.get("config") if isinstance(obj, dict) else None
    return config.get("data") if isinstance(config, dict) else None
