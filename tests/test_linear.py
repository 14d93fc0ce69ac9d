"""Linear probe: heads trained together equal heads trained alone, the split, the schedule, lr selection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dino.eval.linear import (
    CachedFeatures,
    MultiLinearHeads,
    cosine_factor,
    head_accuracies,
    select_and_test,
    stratified_split,
    sweep_on_cached,
    train_heads,
)


def _blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(100)) * 2
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_heads_trained_together_equal_heads_trained_alone():
    torch.manual_seed(0)
    features, labels = _blobs(10, 3, 5, seed=0)
    lrs = [0.01, 0.5, 2.0]
    together = MultiLinearHeads(5, 3, lrs)
    alone = [copy.deepcopy(together) for _ in lrs]
    train_heads(together, CachedFeatures(features, labels, torch.device("cpu"), 8, seed=1), 3, 3, 256)
    for i, lr in enumerate(lrs):
        single = MultiLinearHeads(5, 3, [lr])
        single.heads[0].load_state_dict(alone[i].heads[i].state_dict())
        train_heads(single, CachedFeatures(features, labels, torch.device("cpu"), 8, seed=1), 3, 3, 256)
        torch.testing.assert_close(single.heads[0].weight, together.heads[i].weight)
        torch.testing.assert_close(single.heads[0].bias, together.heads[i].bias)
    assert not torch.allclose(together.heads[0].weight, together.heads[2].weight)


def test_sgd_step_by_hand():
    # One step of plain SGD (momentum buffer starts at the gradient) at lr * batch/256 with cosine factor 1.
    heads = MultiLinearHeads(2, 2, [0.256])
    with torch.no_grad():
        heads.heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        heads.heads[0].bias.zero_()
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    p = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    grad_w = torch.outer(p - torch.tensor([1.0, 0.0]), x[0])
    train_heads(heads, [(x, y)], epochs=1, steps_per_epoch=1, batch_size=100)  # lr = 0.256 * 100 / 256 = 0.1
    torch.testing.assert_close(heads.heads[0].weight, torch.eye(2) - 0.1 * grad_w)


def test_loss_is_the_sum_of_head_losses():
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 4, 2, 2])
    expected = sum(F.cross_entropy(logits[h], targets) for h in range(3))
    torch.testing.assert_close(MultiLinearHeads.loss(logits, targets), expected)


def test_param_groups_carry_each_lr():
    heads = MultiLinearHeads(4, 2, [0.1, 0.01])
    groups = heads.param_groups(lr_scale=2.0)
    assert [g["lr"] for g in groups] == [0.2, 0.02]
    assert groups[0]["params"][0] is heads.heads[0].weight


def test_cosine_schedule():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0)
    assert cosine_factor(2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))


def test_stratified_split_is_per_class_seeded_and_disjoint():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 2 + [3])
    train, val = stratified_split(labels, 0.1, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == len(labels)
    counts = torch.bincount(labels[val], minlength=4).tolist()
    assert counts == [2, 1, 1, 0]  # 10% rounded, at least one, never a class's last image
    again_train, again_val = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(stratified_split(labels, 0.1, seed=1)[1], val)
    with pytest.raises(ValueError, match="too small"):
        stratified_split(torch.tensor([0, 1, 2]), 0.1)


def test_selection_uses_validation_not_test():
    heads = MultiLinearHeads(2, 2, [0.1, 0.2])
    with torch.no_grad():  # head 0 predicts class = feature 0 > feature 1; head 1 the opposite
        heads.heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        heads.heads[1].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        for h in heads.heads:
            h.bias.zero_()
    val_x, val_y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])  # head 0 is right on val
    test_x, test_y = val_x, torch.tensor([1, 0])  # ... and wrong on test
    result = select_and_test(heads, val_x, val_y, test_x, test_y)
    assert result.best_lr == 0.1 and result.val_top1 == [100.0, 0.0]
    assert result.test_top1 == 0.0  # the chosen head's test accuracy, even though head 1 would score 100
    assert head_accuracies(heads, test_x, test_y)[1][0] == 100.0


def test_sweep_on_separable_data_learns():
    train_x, train_y = _blobs(20, 4, 8, seed=0)
    val_x, val_y = _blobs(5, 4, 8, seed=1)
    test_x, test_y = _blobs(10, 4, 8, seed=2)
    result = sweep_on_cached(
        train_x, train_y, val_x, val_y, test_x, test_y, 4, lrs=[1e-4, 1.0], epochs=8, batch_size=16
    )
    assert result.best_lr == 1.0 and result.val_top1[1] > result.val_top1[0]
    assert result.test_top1 == 100.0 and result.test_top5 == 100.0


def test_head_accuracies_count_chunk_by_chunk_as_on_the_whole_set():
    """Counted per chunk (the logits of every head for a whole evaluation set would not fit in memory on
    ImageNet), the accuracies are those of each head's logits on all samples at once."""
    torch.manual_seed(0)
    heads = MultiLinearHeads(6, 12, [0.1, 0.01, 0.001])
    features, labels = torch.randn(101, 6), torch.randint(0, 12, (101,))
    with torch.no_grad():
        logits = heads(features)
    expected = []
    for head_logits in logits:
        top5 = head_logits.topk(5, dim=1).indices
        expected.append(
            (
                100.0 * (head_logits.argmax(1) == labels).double().mean().item(),
                100.0 * (top5 == labels[:, None]).any(1).double().mean().item(),
            )
        )
    got = head_accuracies(heads, features, labels, chunk=7)
    assert [pytest.approx(e) for e in expected] == got and len({g[0] for g in got}) > 1
