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

TeacherMode = Literal["momentum", "student", "previous_iter", "previous_epoch"]
TEACHER_MODES: tuple[TeacherMode, ...] = get_args(TeacherMode)


def init_teacher(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """Copy the student's weights (and buffers) into ``teacher`` and freeze it."""
    teacher.load_state_dict(student.state_dict())
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
    t_params: list[torch.Tensor] = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    if skip is None:
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        return
    # _foreach_lerp_ takes its weight as a number: a tensor there is read on the host (a synchronisation).
    # θ_t += w·(θ_s − θ_t) instead, with w = (1 − m)·(1 − skip) multiplied in on the device.
    steps = torch._foreach_sub(s_params, t_params)
    torch._foreach_mul_(steps, (1.0 - momentum) * (1.0 - skip.float()))
    torch._foreach_add_(t_params, steps)


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

    def before_step(self, student: nn.Module) -> None:
        if self.mode == "previous_iter":
            self._snapshot = [p.detach().clone() for p in student.parameters()]

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
            torch._foreach_copy_(list(teacher.parameters()), self._snapshot)
            self._snapshot = None

    def end_of_epoch(self, teacher: nn.Module, student: nn.Module) -> None:
        if self.mode == "previous_epoch":
            copy_weights(teacher, student)
