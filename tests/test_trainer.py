"""The training step on its own: one step on a tiny model and random crops, no run directory, no data.

The updates are checked against the paper's formulas computed here by hand: the teacher's EMA
θ_t ← m·θ_t + (1 − m)·θ_s with the student's new weights, and the center's c ← m_c·c + (1 − m_c)·mean(g_t).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dino.config import load_config
from dino.devices import resolve_precision
from dino.train.setup import build_student_teacher
from dino.train.trainer import Optimisation, TrainingStep

from .conftest import TINY_OVERRIDES

CPU = torch.device("cpu")


def tiny_config(*overrides: str):
    # No warm-up: the first step has a learning rate above 0. A teacher momentum of 0.5 moves the
    # teacher far enough for the EMA check below to tell a right update from none.
    return load_config(
        None,
        [*TINY_OVERRIDES, "run.batch_size=4", "optim.warmup_epochs=0", "teacher.momentum=0.5", *overrides],
    )


def random_crops(cfg, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    b, d = cfg.run.batch_size, cfg.data
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.local_crops_number
    return [torch.randn(b, 3, s, s, generator=generator) for s in sizes]


def test_one_step_updates_student_teacher_and_center_as_the_paper_says():
    cfg = tiny_config()
    step = TrainingStep.from_config(cfg, CPU)
    crops = random_crops(cfg)
    center_before = torch.randn_like(step.dino_loss.center)  # a center that is not 0: both terms count
    step.dino_loss.center.copy_(center_before)
    student_before = copy.deepcopy(dict(step.student.named_parameters()))
    teacher_before = copy.deepcopy(dict(step.teacher.named_parameters()))
    with torch.no_grad():  # the teacher's outputs in the step: the same teacher on the same global views
        teacher_out = step.teacher(crops[:2])

    loss, stats = step.step(crops, iteration=0, epoch=0)

    assert torch.isfinite(loss) and set(stats) == {"teacher_entropy", "kl"}
    student = dict(step.student.named_parameters())
    moved = [n for n, p in student.items() if not torch.equal(p, student_before[n])]
    assert any(n.startswith("backbone.") for n in moved) and any(n.startswith("head.mlp") for n in moved)
    # head.freeze_last_layer=1: the last layer does not move in epoch 0.
    assert not any(n.startswith("head.last_layer") for n in moved)
    m = 0.5  # teacher.momentum, the schedule's value at iteration 0
    for name, new in step.teacher.named_parameters():
        expected = m * teacher_before[name] + (1 - m) * student[name]
        torch.testing.assert_close(new, expected, rtol=1e-6, atol=1e-8)
        assert new.grad is None
    backbone_move = max((new - teacher_before[n]).abs().max() for n, new in step.teacher.named_parameters())
    assert backbone_move > 1e-5  # the check above tells a moved teacher from one left as it was
    mc = cfg.loss.center_momentum
    expected_center = mc * center_before + (1 - mc) * teacher_out.mean(dim=0, keepdim=True)
    torch.testing.assert_close(step.dino_loss.center, expected_center, rtol=1e-6, atol=1e-7)


def test_the_last_layer_trains_after_the_frozen_epochs():
    cfg = tiny_config()
    step = TrainingStep.from_config(cfg, CPU)
    last_before = copy.deepcopy(step.student.head.last_layer.state_dict())
    step.step(random_crops(cfg), iteration=0, epoch=1)
    last = step.student.head.last_layer.state_dict()
    assert any(not torch.equal(last[k], last_before[k]) for k in last)


def state(step: TrainingStep) -> list[torch.Tensor]:
    """Everything a step may change: both models (weights and BatchNorm statistics), the center and
    the optimiser's state."""
    models = [t.clone() for m in (step.student, step.teacher) for t in m.state_dict().values()]
    optimizer = [v.clone() for s in step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return models + [step.dino_loss.center.clone()] + optimizer


@pytest.mark.parametrize(
    "arch, optimizer", [("vit_tiny", "adamw"), ("resnet18", "lars")], ids=["on-device", "on-host"]
)
def test_a_non_finite_loss_changes_nothing(arch, optimizer):
    """AdamW's fused kernel skips on a device-side flag; LARS is skipped by the host (see
    ``dino.train.guard``); the ResNet's BatchNorm statistics are put back."""
    cfg = tiny_config(f"model.arch={arch}", f"optim.name={optimizer}")
    precision = resolve_precision(cfg.run.precision, CPU)
    student, teacher = build_student_teacher(cfg, CPU)
    optimisation = Optimisation.build(cfg, student, precision, CPU, iters_per_epoch=4)
    skipped: list[tuple[int, float, int]] = []
    step = TrainingStep(
        cfg, student, teacher, optimisation, precision, CPU, on_bad_step=lambda *a: skipped.append(a)
    )
    assert step.guard.on_device == (optimizer == "adamw")
    step.step(random_crops(cfg, seed=1), iteration=0, epoch=1)  # the optimiser has a state to keep
    poisoned = random_crops(cfg, seed=2)
    poisoned[-1][0, 0, 0, 0] = float("nan")  # one pixel of one local view: the student's output and the loss
    before = state(step)

    loss, _ = step.step(poisoned, iteration=1, epoch=1)

    assert not torch.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, state(step), strict=True))
    assert step.guard.poll() == 1 and [(it, consecutive) for it, _, consecutive in skipped] == [(1, 1)]
