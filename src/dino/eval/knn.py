"""Weighted k-NN classification on frozen features (the paper's protocol, Wu et al. 2018).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, which vote
for their class with weight exp(sim / T). Any number of classes; the bank is scanned in chunks of test
samples so that memory stays bounded on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores [N_test, C] from the weighted vote of the k nearest training samples."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    if train_features.shape[0] == 0:
        raise ValueError("the k-NN bank is empty: give at least one labelled training image")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float().to(bank.device), dim=1)
        sims, idx = (queries @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, tuple[float, float]]:
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN classifier for each k."""
    if test_features.shape[0] == 0:
        raise ValueError("the k-NN test set is empty")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results: dict[int, tuple[float, float]] = {}
    targets = test_labels.long().to(train_features.device)
    for k in ks:
        scores = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
        top = scores.topk(min(5, num_classes), dim=1).indices
        top1 = (top[:, 0] == targets).float().mean().item() * 100
        top5 = (top == targets[:, None]).any(dim=1).float().mean().item() * 100
        results[k] = (top1, top5)
    return results
