"""``run.strategy=fsdp``: the student and the teacher sharded with FSDP2, and their checkpoints.

Both models are split the same way — one ``fully_shard`` unit per transformer block, one for the head, the
rest (patch embedding, tokens, final norm) in the root unit — so that each process holds the same slice of
every teacher parameter as of the student's: the EMA runs on those local slices without gathering anything
(:func:`dino.teacher.ema_update`). On GPUs the parameters are gathered in bf16 and the gradients reduced in
fp32 (``MixedPrecisionPolicy``); on the CPU (gloo) everything stays fp32.

Checkpoints of a sharded run are ``torch.distributed.checkpoint`` directories (see
:meth:`dino.checkpoint.CheckpointManager.save_sharded`): each process writes its shards, and loading
reshards them for however many processes read them. :func:`load_into_sharded` reads one into sharded
models (no process holds a full copy); :func:`load_full_into_sharded` puts a consolidated checkpoint (one
written without sharding, or a sharded one read whole) into sharded models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dino.devices import Precision
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import VisionTransformer
from dino.train.optim import optimizer_state_by_name


def shard_models(
    student: MultiCropWrapper,
    teacher: MultiCropWrapper,
    world_size: int,
    device: torch.device,
    precision: Precision,
) -> None:
    """Shard ``student`` and ``teacher`` (equal architectures, already on ``device``) in place over the
    ``world_size`` processes of the default process group. Call before building the optimiser: sharding
    replaces the parameters."""
    mesh = init_device_mesh(device.type, (world_size,))
    mixed = device.type == "cuda" and precision.autocast_dtype == torch.bfloat16
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed
        else MixedPrecisionPolicy()
    )
    for model in (student, teacher):
        backbone = model.backbone
        if not isinstance(backbone, VisionTransformer):  # config validation allows vit_* only
            raise TypeError(f"run.strategy=fsdp shards ViT backbones, not {type(backbone).__name__}")
        # The teacher has no backward pass: every unit, its root included, frees its gathered parameters
        # after the forward pass, so that its registered parameters are the local shards the EMA updates.
        # (FSDP2 otherwise keeps the root's gathered for the backward pass that follows.)
        reshard = True if model is teacher else None
        for block in backbone.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model.head, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)


def sharded_tensors(
    student: MultiCropWrapper, teacher: MultiCropWrapper, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The sharded part of a run's checkpoint (a collective): student, teacher (``backbone.*`` / ``head.*``
    keys, as in the unsharded checkpoints) and optimiser state keyed by parameter name."""
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
    }


def load_into_sharded(
    path: Path, student: MultiCropWrapper, teacher: MultiCropWrapper, optimizer: torch.optim.Optimizer
) -> None:
    """Read the sharded checkpoint directory ``path`` into the sharded models and optimiser (a collective):
    each process reads the slices it holds now, whatever the number of processes that wrote them."""
    reader = dcp.FileSystemReader(str(path))
    saved = set(reader.read_metadata().state_dict_metadata)  # DCP's flattened keys
    state = sharded_tensors(student, teacher, optimizer)
    # Only the optimiser entries the checkpoint has: a parameter without state there (the head's last layer,
    # frozen during the first epoch) gets none now, as in the run that wrote it.
    _keep_saved_entries(
        state["optimizer"]["state"], lambda name, key: f"optimizer.state.{name}.{key}" in saved
    )
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    # strict=False: a parameter may have no state (see above); none is left from the template for it.
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    for name, param in student.named_parameters():
        if name not in state["optimizer"]["state"]:
            optimizer.state.pop(param, None)


def load_full_into_sharded(
    checkpoint: dict[str, Any],
    student: MultiCropWrapper,
    teacher: MultiCropWrapper,
    optimizer: torch.optim.Optimizer,
    parameter_names: list[str],
) -> None:
    """Put a consolidated checkpoint (full tensors on every process) into sharded models: ``student``,
    ``teacher`` and whichever optimiser state it has — ``optimizer`` (positional, as an unsharded run
    saves it; ``parameter_names`` names its parameters in order) or ``optimizer_by_name``."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, checkpoint["student"], options=full)
    set_model_state_dict(teacher, checkpoint["teacher"], options=full)
    if "optimizer" in checkpoint:
        by_name = optimizer_state_by_name(checkpoint["optimizer"], parameter_names)
    elif "optimizer_by_name" in checkpoint:
        by_name = checkpoint["optimizer_by_name"]
    else:
        return
    # The full optimiser state as FSDP lays it out (parameter groups included), its per-parameter entries
    # replaced by the checkpoint's.
    template = get_optimizer_state_dict(student, optimizer, options=full)
    template["state"] = {name: dict(entry) for name, entry in by_name.items() if name in template["state"]}
    set_optimizer_state_dict(
        student, optimizer, template, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    # Loading a full state keeps the state the template was built with (a zero step of every parameter)
    # where the checkpoint has none: drop it, so that such a parameter (the head's last layer, frozen when
    # the checkpoint was written) starts its AdamW steps from the first, as in the run that wrote it.
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    for name, param in zip(parameter_names, in_order, strict=True):
        if name not in by_name:
            optimizer.state.pop(param, None)


def _keep_saved_entries(state: dict[str, dict[str, Any]], saved: Callable[[str, str], bool]) -> None:
    """Drop from optimiser ``state`` (keyed by parameter name) the values ``saved(name, key)`` says the
    checkpoint lacks, and the parameters left without any."""
    for name in list(state):
        entry = {key: value for key, value in state[name].items() if saved(name, key)}
        if entry:
            state[name] = entry
        else:
            del state[name]


def full_backbone_state(model: MultiCropWrapper) -> dict[str, torch.Tensor]:
    """The whole backbone of a sharded ``model`` on the CPU of the first process (empty elsewhere): a
    collective, every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {
        k.removeprefix("backbone."): v
        for k, v in state.items()
        if k.startswith("backbone.") and isinstance(v, torch.Tensor)
    }
