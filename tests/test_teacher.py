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
    rule.before_step(student)
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
