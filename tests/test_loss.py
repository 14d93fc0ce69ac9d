import math

import pytest
import torch

from dino.loss import DINOLoss, sinkhorn_knopp


def hand_loss(student, teacher, center, n_views, n_global, tau_s, tau_t, include_same=False):
    """Plain-Python reference: the paper's formula, pair by pair, sample by sample."""
    batch = len(teacher) // n_global
    total, pairs = 0.0, 0
    for t_view in range(n_global):
        for s_view in range(n_views):
            if s_view == t_view and not include_same:
                continue
            for b in range(batch):
                t = [(v - c) / tau_t for v, c in zip(teacher[t_view * batch + b], center, strict=True)]
                s = [v / tau_s for v in student[s_view * batch + b]]
                zt = sum(math.exp(v) for v in t)
                zs = sum(math.exp(v) for v in s)
                total += (
                    -sum(math.exp(a) / zt * (b_ - math.log(zs)) for a, b_ in zip(t, s, strict=True)) / batch
                )
            pairs += 1
    return total / pairs


def test_loss_matches_hand_computation_and_skips_same_view_pairs():
    torch.manual_seed(0)
    n_views, n_global, batch, k = 4, 2, 3, 5
    student = torch.randn(n_views * batch, k)
    teacher = torch.randn(n_global * batch, k)
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    center = loss_fn.center[0].tolist()
    loss, stats = loss_fn(student, teacher, teacher_temp=0.04)
    expected = hand_loss(student.tolist(), teacher.tolist(), center, n_views, n_global, 0.1, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Including the same-view pairs would give a different number: the skip matters.
    with_same = hand_loss(
        student.tolist(), teacher.tolist(), center, n_views, n_global, 0.1, 0.04, include_same=True
    )
    assert abs(with_same - loss.item()) > 1e-3


def test_center_update_is_ema_of_batch_mean():
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss_fn = DINOLoss(3, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    loss_fn(torch.zeros(4, 3), teacher, teacher_temp=0.04, n_global=2)
    # mean of teacher rows = [2, 2, 2]; 0.9 * [1, 0, -1] + 0.1 * [2, 2, 2]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.1, 0.2, -0.7]]))


def test_center_not_updated_when_asked():
    loss_fn = DINOLoss(3)
    loss_fn(torch.randn(4, 3), torch.randn(2, 3), 0.04, n_global=2, update_center=False)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_diagnostics_entropy_and_kl():
    k = 4
    loss_fn = DINOLoss(k, teacher_norm="none")
    teacher = torch.zeros(2, k)  # uniform teacher: entropy = ln K
    student = torch.zeros(4, k)  # uniform student: KL = 0
    loss, stats = loss_fn(student, teacher, 0.04, n_global=2)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(k))
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(k))  # the collapse value
    assert loss_fn.uniform_entropy == pytest.approx(math.log(k))


def test_gradient_flows_to_student_only():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss, _ = DINOLoss(5)(student, teacher, 0.04, n_global=2)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_sinkhorn_gives_equipartition():
    torch.manual_seed(0)
    q = sinkhorn_knopp(torch.randn(64, 8) * 3, n_iters=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 64 / 8), atol=1e-3, rtol=0)


def test_unknown_variant_refused():
    with pytest.raises(ValueError, match="teacher_norm"):
        DINOLoss(4, teacher_norm="whiten")  # type: ignore[arg-type]


def pairwise_reference(student, teacher, center, n_global, tau_s=0.1, tau_t=0.04):
    """The loss, KL and entropy pair by pair with torch ops (differentiable), as the released code loops."""
    batch = teacher.shape[0] // n_global
    log_p = torch.log_softmax(student / tau_s, dim=-1).chunk(student.shape[0] // batch)
    p_t = torch.softmax((teacher - center) / tau_t, dim=-1).chunk(n_global)
    total, kl, pairs = 0.0, 0.0, 0
    for t, p in enumerate(p_t):
        for s, lp in enumerate(log_p):
            if s != t:
                ce = -(p * lp).sum(-1).mean()
                total = total + ce
                kl = kl + ce.detach() + (p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
                pairs += 1
    entropy = torch.stack([-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() for p in p_t]).mean()
    return total / pairs, kl / pairs, entropy


@pytest.mark.parametrize("n_views, n_global", [(10, 2), (3, 2), (1, 2), (2, 1)])
def test_loss_kl_entropy_and_gradient_equal_the_pairwise_loop(n_views, n_global):
    torch.manual_seed(1)
    batch, k = 4, 7
    student = torch.randn(n_views * batch, k, requires_grad=True)
    teacher = torch.randn(n_global * batch, k)
    loss_fn = DINOLoss(k)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    ref_loss, ref_kl, ref_entropy = pairwise_reference(student, teacher, loss_fn.center, n_global)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    loss, stats = loss_fn(student, teacher, 0.04, n_global=n_global, update_center=False)
    (grad,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    torch.testing.assert_close(stats["kl"], ref_kl)
    torch.testing.assert_close(stats["teacher_entropy"], ref_entropy)


def test_single_view_refused():
    with pytest.raises(ValueError, match="at least two views"):
        DINOLoss(5)(torch.randn(2, 5), torch.randn(2, 5), 0.04, n_global=1)


def test_mismatched_view_counts_are_refused():
    loss = DINOLoss(5)
    with pytest.raises(ValueError, match="not a multiple of n_global=2"):
        loss(torch.randn(8, 5), torch.randn(3, 5), 0.04)
    with pytest.raises(ValueError, match="whole views of the teacher's batch of 2"):
        loss(torch.randn(5, 5), torch.randn(4, 5), 0.04)
    with pytest.raises(ValueError, match="same K"):
        loss(torch.randn(8, 6), torch.randn(4, 5), 0.04)


def _sinkhorn_on_two_processes(rank: int, init_file: str, logits: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = logits.shape[0] // 2
    q = sinkhorn_knopp(logits[rank * half : (rank + 1) * half])
    torch.save(q, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sinkhorn_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    """The batch split over processes gives the targets of the whole batch on one: the normalisations,
    and the shift before the exponential, are global. Each half here has its own scale, so per-process
    shifts would weigh the halves differently."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    logits = torch.cat([torch.randn(6, 8) * 4 + 5, torch.randn(6, 8)])
    mp.spawn(_sinkhorn_on_two_processes, args=(str(tmp_path / "init"), logits, str(tmp_path / "q")), nprocs=2)
    split = torch.cat([torch.load(tmp_path / f"q.{rank}") for rank in (0, 1)])
    torch.testing.assert_close(split, sinkhorn_knopp(logits))
