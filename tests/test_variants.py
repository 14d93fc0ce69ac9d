"""The paper's study variants as configuration: the MSE loss, one-hot teacher targets, the head's
activation / L2 bottleneck / predictor, the student's k-NN, and the time budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino.config import ConfigError, load_config
from dino.loss import DINOLoss
from dino.models.head import DINOHead
from dino.teacher import TeacherUpdater, ema_update
from dino.train.loop import train
from dino.train.setup import build_student_teacher
from dino.train.trainer import TrainingStep

from .conftest import TINY_OVERRIDES


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def _outputs(n_views=4, batch=5, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_views * batch, k, generator=g), torch.randn(2 * batch, k, generator=g)


def _mse_by_pairs(student, teacher, batch, center=None):
    """The mean over (teacher view t, student view s != t) pairs of the mean over the batch of
    ||s/|s| - t/|t|||^2, written pair by pair."""
    t_views = (teacher - (center if center is not None else 0)).split(batch)
    s_views = student.split(batch)
    terms = []
    for i, t in enumerate(t_views):
        for j, s in enumerate(s_views):
            if i != j:
                terms.append(((F.normalize(s, dim=-1) - F.normalize(t, dim=-1)) ** 2).sum(-1).mean())
    return torch.stack(terms).mean()


def test_mse_loss_is_the_squared_distance_of_normalised_outputs_without_temperature_or_center():
    student, teacher = _outputs()
    loss_fn = DINOLoss(16, student_temp=0.1, teacher_norm="none", kind="mse")
    loss, stats = loss_fn(student, teacher, teacher_temp=0.04)
    torch.testing.assert_close(loss, _mse_by_pairs(student, teacher, 5))
    # No temperature: neither the student's nor the teacher's changes it.
    other, _ = DINOLoss(16, student_temp=0.5, teacher_norm="none", kind="mse")(
        student, teacher, teacher_temp=0.2
    )
    torch.testing.assert_close(other, loss)
    # No center: it is neither used nor updated.
    assert torch.count_nonzero(loss_fn.center) == 0
    assert set(stats) == {"teacher_entropy", "kl"}  # the softmax diagnostics, still logged


def test_mse_with_centering_centres_the_teacher_first():
    student, teacher = _outputs(seed=1)
    loss_fn = DINOLoss(16, teacher_norm="centering", kind="mse", center_momentum=0.0)
    loss_fn(student, teacher, 0.04)  # momentum 0: the center becomes this batch's teacher mean
    center = teacher.mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, center)
    loss, _ = loss_fn(student, teacher, 0.04, update_center=False)
    torch.testing.assert_close(loss, _mse_by_pairs(student, teacher, 5, center))
    assert not torch.allclose(loss, _mse_by_pairs(student, teacher, 5))


def test_mse_gradient_flows_to_the_student_only():
    student, teacher = _outputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, _ = DINOLoss(16, teacher_norm="none", kind="mse")(student, teacher, 0.04)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_a_zero_teacher_temperature_gives_one_hot_targets_of_the_centred_argmax():
    loss_fn = DINOLoss(6, teacher_norm="centering")
    loss_fn.center.copy_(torch.tensor([[0.0, 10.0, 0, 0, 0, 0]]))
    logits = torch.tensor([[1.0, 5.0, 0, 0, 0, 0], [0.0, 0.0, 0, 3.0, 0, 0]])
    targets = loss_fn.teacher_probs(logits, 0.0)
    # Row 0: 5 - 10 < 1: the center moves the argmax from dimension 1 to dimension 0.
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0]]))
    student, teacher = _outputs(k=6)
    loss, stats = loss_fn(student, teacher, 0.0)
    assert math.isfinite(loss.item()) and stats["teacher_entropy"].item() == 0.0


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.kind=mse", "loss.teacher_norm=sinkhorn"], "loss.teacher_norm"),
        (["loss.teacher_temp=0"], "loss.teacher_temp"),  # 0 only for both temperatures together
        (["loss.kind=huber"], "loss.kind"),
        (["head.activation=tanh"], "head.activation"),
        (["head.predictor_hidden_dim=-1"], "head.predictor_hidden_dim"),
        (["run.max_minutes=-1"], "run.max_minutes"),
    ],
)
def test_bad_variant_settings_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_zero_teacher_temperature_is_accepted_for_both_temperatures():
    cfg = load_config(None, ["loss.teacher_temp=0", "loss.warmup_teacher_temp=0"])
    assert cfg.loss.teacher_temp == 0


def test_head_activation_and_l2_bottleneck():
    torch.manual_seed(0)
    relu = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, nlayers=3, activation="relu")
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 2
    assert not any(isinstance(m, nn.GELU) for m in relu.modules())
    plain = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, nlayers=3, l2_bottleneck=False)
    x = torch.randn(3, 8)
    w = plain.last_layer.weight
    torch.testing.assert_close(plain(x), plain.mlp(x) @ w.t())
    normed = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, nlayers=3)
    normed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(normed(x), F.normalize(plain.mlp(x), dim=-1) @ w.t())


def _predictor_config(tmp_path, extra=()):
    return load_config(
        None,
        TINY_OVERRIDES
        + ["head.predictor=true", "head.predictor_hidden_dim=24", "head.freeze_last_layer=0",
           f"run.output_dir={tmp_path}", *extra],
    )  # fmt: skip


def test_the_predictor_is_on_the_student_only_and_trains():
    cfg = _predictor_config("unused")
    step = TrainingStep.from_config(cfg, torch.device("cpu"), iters_per_epoch=4)
    student, teacher = step.student, step.teacher
    assert student.head.predictor is not None and teacher.head.predictor is None
    # The teacher starts as the student without the predictor.
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, dict(student.named_parameters())[name])
    before = {n: p.detach().clone() for n, p in student.head.predictor.named_parameters()}
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)
    ]
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    step.step(crops, iteration=2, epoch=0)  # past the first warm-up step, whose lr is 0
    assert any(not torch.equal(before[n], p) for n, p in student.head.predictor.named_parameters())
    # The EMA moved the teacher's head towards the student's, name by name.
    momentum = float(step.schedules.momentum[2])
    s = dict(student.named_parameters())
    name = "head.last_layer.weight_v"
    torch.testing.assert_close(
        dict(teacher.named_parameters())[name],
        momentum * teacher_before[name] + (1 - momentum) * s[name].detach(),
    )


def test_teacher_rules_pair_parameters_by_name_when_the_student_has_more():
    student = nn.Sequential()
    student.add_module("a", nn.Linear(2, 2))
    student.add_module("extra", nn.Linear(2, 2))
    student.add_module("b", nn.Linear(2, 2))
    teacher = nn.Sequential()
    teacher.add_module("a", nn.Linear(2, 2))
    teacher.add_module("b", nn.Linear(2, 2))
    ema_update(teacher, student, 0.0)
    torch.testing.assert_close(teacher.b.weight, student.b.weight)
    for mode in ("student", "previous_iter"):
        rule = TeacherUpdater(mode)
        rule.before_step(teacher, student)
        rule.after_step(teacher, student, 0.9)
        torch.testing.assert_close(teacher.a.weight, student.a.weight)


@pytest.mark.slow
def test_the_predictor_is_saved_and_resumed(small_folder, tmp_path):
    out = tmp_path / "run"
    cfg = _predictor_config(out, [f"data.path={small_folder}", "run.epochs=1"])
    train(cfg)
    checkpoint = torch.load(sorted((out / "checkpoints").glob("last-*.pth"))[-1], weights_only=True)
    assert any(k.startswith("head.predictor.") for k in checkpoint["student"])
    assert not any(k.startswith("head.predictor.") for k in checkpoint["teacher"])
    train(_predictor_config(out, [f"data.path={small_folder}", "run.epochs=2"]))
    assert [e["epoch"] for e in records(out, "epoch")] == [0, 1]
    resumed, _ = build_student_teacher(cfg, torch.device("cpu"))
    last = torch.load(sorted((out / "checkpoints").glob("last-*.pth"))[-1], weights_only=True)
    resumed.head.load_state_dict(
        {k.removeprefix("head."): v for k, v in last["student"].items() if k.startswith("head.")}
    )


@pytest.mark.slow
def test_the_student_knn_is_scored_beside_the_teachers(small_folder, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, TINY_OVERRIDES + [
        f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=1", "monitor.knn_every=1",
        f"monitor.knn_val={small_folder}", "monitor.knn_student=true"]))  # fmt: skip
    knn = records(out, "knn")
    assert [r["epoch"] for r in knn] == [-1, 0]
    for r in knn:
        assert 0 <= r["knn_student_top1"] <= 100 and 0 <= r["knn_top1"] <= 100
    # At random init the teacher is the student without stochastic depth: the same features in eval mode.
    assert knn[0]["knn_student_top1"] == knn[0]["knn_top1"]


@pytest.mark.slow
def test_a_time_limit_ends_the_run_at_an_epoch_end_with_its_checkpoint(small_folder, tmp_path):
    out = tmp_path / "run"
    common = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=4"]
    train(load_config(None, common + ["run.max_minutes=0.00001"]))
    (done,) = records(out, "done")
    assert done["stopped_by"] == "time limit" and done["epochs"] == 1 and done["train_seconds"] > 0
    checkpoint = torch.load(sorted((out / "checkpoints").glob("last-*.pth"))[-1], weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["train_seconds"] > 0
    assert (out / "teacher_backbone.pth").is_file()
    # Resumed with the same limit, nothing more is trained; without it, the run goes on to run.epochs.
    train(load_config(None, common + ["run.max_minutes=0.00001"]))
    assert len(records(out, "epoch")) == 1
    train(load_config(None, common))
    assert [e["epoch"] for e in records(out, "epoch")] == [0, 1, 2, 3]
    assert records(out, "done")[-1]["stopped_by"] == "epochs"
