"""Low-shot: deterministic per-class subsets and a logistic regression checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dino.eval.linear import stratified_split
from dino.eval.lowshot import (
    fit_logistic_regression,
    logistic_objective,
    lowshot_evaluate,
    lowshot_subset,
    shuffled_class_members,
)


def test_subset_sizes_per_class():
    labels = torch.tensor([0] * 200 + [1] * 50 + [2] * 3)
    subset = lowshot_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [20, 5, 1]  # round(10%), at least one per class
    assert torch.bincount(labels[lowshot_subset(labels, 0.01, seed=0)]).tolist() == [2, 1, 1]
    assert subset.unique().numel() == subset.numel()


def test_subsets_are_deterministic_and_nested():
    labels = torch.arange(500) % 5
    small, large = lowshot_subset(labels, 0.02, seed=3), lowshot_subset(labels, 0.1, seed=3)
    assert torch.equal(small, lowshot_subset(labels, 0.02, seed=3))
    assert set(small.tolist()) <= set(large.tolist())
    assert not torch.equal(large, lowshot_subset(labels, 0.1, seed=4))
    with pytest.raises(ValueError, match="fraction"):
        lowshot_subset(labels, 0.0)


# Indices recorded from lowshot_subset and linear.stratified_split before they shared one per-class draw.
_LABELS = [2, 0, 1, 2, 2, 0, -1, 1, 0, 2, 1, 0, 2, 1, 0, -1, 2, 1]
_RECORDED = {
    0: ([0, 1, 2, 9, 14, 17], [3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 16], [0, 1, 2, 9, 14, 15, 17]),
    7: ([0, 1, 10, 11, 12, 17], [2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 16], [0, 1, 10, 11, 12, 15, 17]),
}


@pytest.mark.parametrize("seed", sorted(_RECORDED))
def test_shared_class_draw_keeps_the_recorded_subsets(seed):
    labels = torch.tensor(_LABELS)
    lowshot, train, val = _RECORDED[seed]
    assert lowshot_subset(labels, 0.3, seed).tolist() == lowshot
    assert [t.tolist() for t in stratified_split(labels, 0.4, seed)] == [train, val]
    # the shared draw itself: the low-shot subset is the head of each labelled class's order
    orders = list(shuffled_class_members(labels, seed, labelled_only=True))
    heads = torch.cat([o[: max(1, round(0.3 * o.numel()))] for o in orders]).sort().values
    assert heads.tolist() == lowshot
    assert len(list(shuffled_class_members(labels, seed))) == len(orders) + 1  # -1 counted without the flag


def test_objective_by_hand():
    w, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.0, 0.5])
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1])
    # sample 1: logits (1, 0.5) -> -log(e^0.5 / (e + e^0.5)); sample 2: logits (0, 2.5) -> -log(e^2.5 / (1 + e^2.5))
    ce = (
        -math.log(math.exp(0.5) / (math.e + math.exp(0.5))) - math.log(math.exp(2.5) / (1 + math.exp(2.5)))
    ) / 2
    expected = ce + 0.5 * 0.1 * (1 + 4)
    assert logistic_objective(w, b, x, y, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 12, generator=g, dtype=torch.float64)
    y = torch.arange(90) % 3
    x[:, :3] += 1.5 * F.one_hot(y, 3)
    l2 = 1e-2
    model = fit_logistic_regression(x, y, 3, l2=l2)
    prepared = F.normalize(x - x.mean(0), dim=1).numpy()
    # scikit-learn minimises C * sum(CE) + ||W||^2 / 2, the same optimum as mean(CE) + l2/2 ||W||^2 at C = 1/(l2 n).
    reference = sklearn.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(
        prepared, y.numpy()
    )
    np.testing.assert_allclose(model.weight.numpy(), reference.coef_, atol=1e-4)
    np.testing.assert_allclose(model.bias.numpy(), reference.intercept_, atol=1e-4)
    test = torch.randn(40, 12, generator=g, dtype=torch.float64)
    ours = model.scores(test).argmax(1).numpy()
    theirs = reference.predict(F.normalize(test - x.mean(0), dim=1).numpy())
    assert (ours == theirs).all()


def test_lowshot_evaluate_on_separable_data():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4, 6) * 4
    train_y, test_y = torch.arange(400) % 4, torch.arange(40) % 4
    train_x = centres[train_y] + 0.3 * torch.randn(400, 6, generator=g)
    test_x = centres[test_y] + 0.3 * torch.randn(40, 6, generator=g)
    results = lowshot_evaluate(train_x, train_y, test_x, test_y, 4, fractions=(0.01, 0.1), l2=1e-3)
    assert results["1%"]["labelled_images"] == 4 and results["10%"]["labelled_images"] == 40
    assert results["1%"]["top1"] == 100.0 and results["10%"]["top1"] == 100.0


def test_fit_reaches_a_stationary_point_of_the_objective():
    # The closed-form gradient used for fitting, checked through autograd on the stated objective.
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.arange(30) % 4
    model = fit_logistic_regression(x, y, 4, l2=0.05, tolerance=1e-10)
    w, b = model.weight.clone().requires_grad_(), model.bias.clone().requires_grad_()
    logistic_objective(w, b, model.preprocess(x), y, 0.05).backward()
    assert w.grad.abs().max() < 1e-7 and b.grad.abs().max() < 1e-7
