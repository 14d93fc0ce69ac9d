"""Low-shot classification: multinomial logistic regression on frozen features with few labels per class.

The paper trains a logistic regression on frozen features with 1% and 10% of the ImageNet labels. Here the
labelled subset is a deterministic fraction of every class (at least one image each), drawn from a seed; the
subsets for growing fractions are nested (the per-class orders, :func:`shuffled_class_members`, also give
the linear probe its validation split). Features are centred on the labelled subset's mean and
L2-normalised; the model minimises the mean cross-entropy plus ``l2 / 2 · ||W||²`` (bias unpenalised) with
full-batch L-BFGS (closed-form gradient, no autograd), a convex problem with one optimum.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dino.eval.knn import topk_accuracy

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.1)
DEFAULT_L2 = 1e-4


def shuffled_class_members(labels: Tensor, seed: int, labelled_only: bool = False) -> Iterator[Tensor]:
    """The sample indices of each class c of ``labels`` (ascending c), in a random order seeded by
    ``seed × 1000003 + c``: the same seed gives the same order however the other classes change.

    ``labelled_only`` skips negative labels (unlabelled samples).
    """
    labels = labels.cpu().long()
    for c in torch.unique(labels).tolist():
        if labelled_only and c < 0:
            continue
        members = (labels == c).nonzero().flatten()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + c)
        yield members[torch.randperm(members.numel(), generator=generator)]


def lowshot_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Sorted indices of ``max(1, round(fraction · n_c))`` samples of every class c, chosen by ``seed``.

    One random order per class (from the seed) is cut at the requested size, so for the same seed a
    smaller fraction's subset is contained in a larger one's.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    chosen = [
        order[: max(1, round(fraction * order.numel()))]
        for order in shuffled_class_members(labels, seed, labelled_only=True)
    ]
    if not chosen:
        raise ValueError("no labelled sample to draw a low-shot subset from")
    return torch.cat(chosen).sort().values


@dataclass
class LogisticRegression:
    """A fitted multinomial logistic regression with its feature preprocessing (centring, L2 norm)."""

    weight: Tensor  # [C, D]
    bias: Tensor  # [C]
    center: Tensor  # [D]
    iterations: int = 0

    def preprocess(self, features: Tensor) -> Tensor:
        return F.normalize(features.to(self.weight) - self.center, dim=1)

    def scores(self, features: Tensor) -> Tensor:
        """Logits [N, C] for raw (unpreprocessed) features."""
        return self.preprocess(features) @ self.weight.T + self.bias


def logistic_objective(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy of softmax(x W^T + b) plus l2 / 2 · ||W||² (the quantity that is minimised)."""
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float = DEFAULT_L2,
    max_iter: int = 1000,
    tolerance: float = 1e-7,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> LogisticRegression:
    """Fit on (features, labels) with full-batch L-BFGS (strong-Wolfe line search) from zero weights."""
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError("logistic regression needs as many labels as feature rows, and at least one row")
    if l2 < 0:
        raise ValueError(f"l2 regularisation must be >= 0, got {l2}")
    device = device or features.device
    x = features.to(device, dtype)
    center = x.mean(dim=0)
    x = F.normalize(x - center, dim=1)
    y = labels.to(device).long()
    onehot = F.one_hot(y, num_classes).to(dtype)
    weight = torch.zeros(num_classes, x.shape[1], device=device, dtype=dtype)
    bias = torch.zeros(num_classes, device=device, dtype=dtype)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    @torch.no_grad()
    def closure() -> Tensor:
        # The objective and its closed-form gradient: d/dlogits of the mean CE is (softmax - onehot) / n.
        log_p = torch.log_softmax(x @ weight.T + bias, dim=1)
        residual = (log_p.exp() - onehot) / x.shape[0]
        weight.grad = residual.T @ x + l2 * weight
        bias.grad = residual.sum(dim=0)
        return -(log_p * onehot).sum() / x.shape[0] + 0.5 * l2 * weight.pow(2).sum()

    optimizer.step(closure)
    iterations = int(
        optimizer.state[weight].get("n_iter", 0)
    )  # L-BFGS keeps its state on the first parameter
    return LogisticRegression(weight, bias, center, iterations)


def lowshot_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    max_iter: int = 1000,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Test top-1/top-5 (percent) of a logistic regression fitted on each label fraction of the train set."""
    if test_features.shape[0] == 0:
        raise ValueError("the low-shot test set is empty")
    results: dict[str, dict[str, float]] = {}
    for fraction in fractions:
        subset = lowshot_subset(train_labels, fraction, seed)
        model = fit_logistic_regression(
            train_features[subset], train_labels[subset], num_classes, l2, max_iter, device=device
        )
        top1, top5 = topk_accuracy(model.scores(test_features.to(model.weight.device)).cpu(), test_labels)
        results[f"{fraction * 100:g}%"] = {
            "top1": top1,
            "top5": top5,
            "labelled_images": int(subset.numel()),
            "lbfgs_iterations": model.iterations,
        }
    return results
