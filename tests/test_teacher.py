import pytest
import torch

from dino.teacher import TeacherUpdater, ema_update, init_teacher


def pair():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    init_teacher(teacher, student)
    return student, teacher


def test_init_copies_and_freezes():
    student, teacher = pair()
    assert all(
        torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), teacher.state_dict().values(), strict=True)
    )
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_update_by_hand():
    student, teacher = pair()
    before = teacher[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema_update(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0].weight, 0.9 * before + 0.1 * (before + 1.0))
    ema_update(teacher, student, momentum=1.0)  # final momentum 1: the teacher stops moving
    torch.testing.assert_close(teacher[0].weight, 0.9 * before + 0.1 * (before + 1.0))


@pytest.mark.parametrize("mode", ["student", "previous_iter", "previous_epoch"])
def test_variants(mode):
    student, teacher = pair()
    rule = TeacherUpdater(mode)
    start = student[0].weight.detach().clone()
    rule.before_step(teacher, student)
    with torch.no_grad():
        student[0].weight.add_(1.0)  # the optimiser step
    rule.after_step(teacher, student, momentum=0.996)
    expected = {"student": start + 1, "previous_iter": start, "previous_epoch": start}[mode]
    torch.testing.assert_close(teacher[0].weight, expected)
    rule.end_of_epoch(teacher, student)
    if mode == "previous_epoch":
        torch.testing.assert_close(teacher[0].weight, start + 1)


def test_unknown_mode():
    with pytest.raises(ValueError, match="teacher mode"):
        TeacherUpdater("frozen")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["momentum", "student", "previous_epoch"])
def test_the_teacher_keeps_its_own_batch_norm_statistics(mode):
    """As in the original code, only parameters follow the student: the teacher's BatchNorm running
    statistics are those of its own forward passes (global views), not the student's (local views last)."""
    student, teacher = pair()
    student.train(), teacher.train()
    torch.manual_seed(1)
    teacher(torch.randn(16, 3))  # the teacher sees its views
    student(torch.randn(16, 3) * 5 + 3)  # the student sees others
    own = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k or "tracked" in k}
    assert not torch.allclose(own["1.running_mean"], student[1].running_mean)
    with torch.no_grad():
        student[0].weight.add_(1.0)  # an optimiser step
    start = teacher[0].weight.clone()
    rule = TeacherUpdater(mode)
    rule.after_step(teacher, student, momentum=0.5)
    rule.end_of_epoch(teacher, student)
    for key, value in own.items():
        assert torch.equal(teacher.state_dict()[key], value), key
    moved = {"momentum": 0.5, "student": 1.0, "previous_epoch": 1.0}[mode]
    torch.testing.assert_close(teacher[0].weight, start + moved)  # the parameters did follow


def test_the_masked_ema_reads_nothing_back_to_the_host():
    """With a device-side ``skip`` flag the update is decided on the device: no tensor is turned into a
    Python number (on a GPU that would wait for the step to finish)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    student, teacher = pair()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    start = teacher[0].weight.clone()
    with Calls() as calls:
        ema_update(teacher, student, 0.75, skip=torch.tensor(0.0))
    assert not any("_local_scalar_dense" in op for op in calls.ops), calls.ops
    torch.testing.assert_close(teacher[0].weight, start + 0.25)
