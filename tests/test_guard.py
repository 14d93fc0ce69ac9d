"""The non-finite-loss guard: a flagged step changes nothing, decided on the device or on the host."""

from __future__ import annotations

import pytest
import torch

from dino.loss import DINOLoss
from dino.teacher import ema_update, init_teacher
from dino.train.guard import BatchNormStatsKeeper, NonFiniteGuard, TrainingDiverged
from dino.train.optim import LARS, build_optimizer, set_schedules


def models():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 6))
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 6))
    return student, init_teacher(teacher, student)


def make_guard(optimizer, recorded, max_bad_steps=2, **kwargs):
    return NonFiniteGuard(
        optimizer,
        torch.device("cpu"),
        max_bad_steps,
        on_bad_step=lambda it, loss, n: recorded.append((it, n)),
        divergence_message=lambda n: f"stopped after {n}",
        **kwargs,
    )


def one_step(student, teacher, optimizer, guard, dino_loss, iteration, poison):
    """A training step as the loop runs it; ``poison`` makes the student's outputs (and so the loss and
    the student's BatchNorm statistics) NaN."""
    x = torch.randn(16, 5)
    bn_stats = BatchNormStatsKeeper(student, teacher)
    bn_stats.save()
    with torch.no_grad():
        t_out = torch.cat([teacher(x), teacher(x + 0.1)])
    student_x = torch.cat([x, x + 0.1])
    if poison:
        student_x[0, 0] = float("nan")
    s_out = student(student_x)
    loss, _ = dino_loss(s_out, t_out, 0.04, update_center=False)
    optimizer.zero_grad(set_to_none=True)
    if not guard.admit(iteration, loss):
        bn_stats.restore()
    else:
        dino_loss.update_center(t_out, skip=guard.mask)
        loss.backward()
        if guard.on_device:
            bn_stats.restore(skip=guard.mask)
        optimizer.step()
        ema_update(teacher, student, 0.9, guard.mask)


def snapshot(*modules):
    return [t.clone() for m in modules for t in m.state_dict().values()]


def optimizer_state(optimizer):
    return [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "lars"])
def test_flagged_steps_change_nothing(optimizer_name):
    student, teacher = models()
    optimizer = build_optimizer(student, optimizer_name)
    set_schedules(optimizer, 0.01, 0.04)
    dino_loss = DINOLoss(6)
    recorded: list = []
    guard = make_guard(optimizer, recorded, max_bad_steps=5)
    assert guard.on_device == (optimizer_name != "lars")  # the fused kernels skip on a device flag

    def state():  # weights and BatchNorm statistics of both networks, the center, the optimiser state
        return snapshot(student, teacher) + [dino_loss.center.clone()] + optimizer_state(optimizer)

    one_step(student, teacher, optimizer, guard, dino_loss, 0, False)
    for it in range(1, 5):
        poison = it in (2, 3)
        before = state()
        one_step(student, teacher, optimizer, guard, dino_loss, it, poison)
        changed = [not torch.equal(a, b) for a, b in zip(before, state(), strict=True)]
        assert not any(changed) if poison else any(changed)
    assert guard.poll() == 0
    assert recorded == [(2, 1), (3, 2)]
    if optimizer_name == "adamw":  # the skipped steps are not counted by Adam's bias correction either
        assert {s["step"].item() for s in optimizer.state.values()} == {3.0}


def test_device_mode_stops_a_diverging_run_when_polled():
    student, teacher = models()
    optimizer = build_optimizer(student, "adamw")
    set_schedules(optimizer, 0.01, 0.04)
    recorded: list = []
    guard = make_guard(optimizer, recorded, max_bad_steps=2)
    dino_loss = DINOLoss(6)
    one_step(student, teacher, optimizer, guard, dino_loss, 0, False)
    for it in range(1, 4):
        one_step(student, teacher, optimizer, guard, dino_loss, it, True)
    assert recorded == []  # nothing read on the host yet
    with pytest.raises(TrainingDiverged, match="stopped after 3"):
        guard.poll()
    assert recorded == [(1, 1), (2, 2), (3, 3)]


def test_host_mode_is_used_where_the_update_cannot_be_masked_on_the_device():
    student, _ = models()
    fused = build_optimizer(student, "adamw")
    assert not make_guard(fused, [], grad_scaler_enabled=True).on_device
    assert not make_guard(fused, [], teacher_mode="previous_iter").on_device
    assert not make_guard(build_optimizer(student, "adamw", fused=False), []).on_device
    assert isinstance(build_optimizer(student, "lars"), LARS)


def test_masked_center_and_teacher_updates_by_hand():
    dino_loss = DINOLoss(3, center_momentum=0.5)
    out = torch.tensor([[2.0, 0.0, 4.0]])
    dino_loss.update_center(out, skip=torch.tensor(1.0))
    assert torch.equal(dino_loss.center, torch.zeros(1, 3))
    dino_loss.update_center(out, skip=torch.tensor(0.0))
    assert torch.equal(dino_loss.center, torch.tensor([[1.0, 0.0, 2.0]]))

    student, teacher = models()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(float("nan"))
    before = snapshot(teacher)
    ema_update(teacher, student, 0.75, skip=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(teacher), strict=True))
    ema_update(teacher, student, 0.75, skip=torch.tensor(0.0))
    torch.testing.assert_close(teacher[0].bias, before[1] + 0.25)
