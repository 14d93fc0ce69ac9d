"""How the teacher follows the student: EMA (the paper's default) and the ablation variants.

The teacher has the student's architecture (without stochastic depth), never receives gradients and is
what gets evaluated. Variants from the paper's teacher study (Table "Building different teachers"):
``momentum`` (EMA, θ_t ← λθ_t + (1 − λ)θ_s), ``student`` (a copy of the current student),
``previous_iter`` (the student of the previous iteration) and ``previous_epoch`` (the student at the end of
the previous epoch).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.distributed.tensor import DTensor

TeacherMode = Literal["momentum", "student", "previous_iter", "previous_epoch"]
TEACHER_MODES: tuple[TeacherMode, ...] = get_args(TeacherMode)


def shared_parameters(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's parameters and the student's of the same names, in the same order. The student may
    have parameters of its own (a predictor) that the teacher has no counterpart for: they are left out.

    The common case (the same parameter lists) pairs them by position without building names."""
    t_params: list[torch.Tensor] = list(teacher.parameters())
    s_params: list[torch.Tensor] = list(student.parameters())
    if len(t_params) == len(s_params):
        return t_params, s_params
    by_name = dict(student.named_parameters())
    t_named = list(teacher.named_parameters())
    missing = [name for name, _ in t_named if name not in by_name]
    if missing:
        raise ValueError(f"the student has no parameters named like the teacher's {missing[:3]}")
    return [p for _, p in t_named], [by_name[name] for name, _ in t_named]


def init_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """Copy the student's weights (and buffers) into ``teacher`` and freeze it; student-only modules (a
    predictor) are left out."""
    teacher_keys = teacher.state_dict().keys()
    teacher.load_state_dict({k: v for k, v in student.state_dict().items() if k in teacher_keys})
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, momentum: float, skip: torch.Tensor | None = None
) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s for every parameter (multi-tensor ops).

    Buffers are not touched: the teacher's BatchNorm statistics are its own, gathered by its forward
    passes on the global views (in training mode, as the original code keeps it), not the student's,
    whose last forward pass of a step is on the small local views.

    ``skip``: a 0-dim 0/1 tensor on the device; where it is 1 the teacher is left as it is, decided
    without a host synchronisation.
    """
    t_params, s_params = shared_parameters(teacher, student)
    t_params = _local_shards(t_params)
    s_params = _local_shards([p.detach() for p in s_params])
    if skip is None:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        return
    # _foreach_lerp_ takes its weight as a number: a tensor there is read on the host (a synchronisation).
    # θ_t += w·(θ_s − θ_t) instead, with w = (1 − m)·(1 − skip) multiplied in on the device.
    steps = torch._foreach_sub(s_params, t_params)
    torch._foreach_mul_(steps, (1.0 - momentum) * (1.0 - skip.float()))
    torch._foreach_add_(t_params, steps)


def _local_shards(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's slice on this process when the models are sharded (FSDP2 ``DTensor``): the teacher
    is sharded as the student is, so the EMA is elementwise on the local slices, with no communication."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


@torch.no_grad()
def copy_weights(teacher: nn.Module, student: nn.Module) -> None:
    """The student's parameters into the teacher (its buffers stay its own, as with the EMA)."""
    ema_update(teacher, student, 0.0)


class TeacherUpdater:
    """Applies the chosen teacher rule around each optimiser step and at epoch ends."""

    def __init__(self, mode: TeacherMode = "momentum") -> None:
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {TEACHER_MODES}, got {mode!r}")
        self.mode = mode
        self._snapshot: list[torch.Tensor] | None = None

    def before_step(self, teacher: nn.Module, student: nn.Module) -> None:
        if self.mode == "previous_iter":
            self._snapshot = [p.detach().clone() for p in shared_parameters(teacher, student)[1]]

    @torch.no_grad()
    def after_step(
        self, teacher: nn.Module, student: nn.Module, momentum: float, skip: torch.Tensor | None = None
    ) -> None:
        """``skip`` (the momentum rule only): a device-side flag that leaves the teacher unchanged."""
        if self.mode == "momentum":
            ema_update(teacher, student, momentum, skip)
        elif self.mode == "student":
            copy_weights(teacher, student)
        elif self.mode == "previous_iter" and self._snapshot is not None:
            torch._foreach_copy_(shared_parameters(teacher, student)[0], self._snapshot)
            self._snapshot = None

    def end_of_epoch(self, teacher: nn.Module, student: nn.Module) -> None:
        if self.mode == "previous_epoch":
            copy_weights(teacher, student)
