"""Weighted k-NN classification on frozen features (the paper's protocol, after Wu et al. 2018).

Features are L2-normalised; each test sample takes its k most cosine-similar training samples, which vote
for their class with weight exp(sim / T) (T = 0.07). Any number of classes and any test-set size. The
similarity matrix is never materialised whole: test samples are processed in chunks, and a large bank is
scanned in chunks too, keeping a running top-k, so memory stays bounded on CPU and GPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_BANK_CHUNK = 65536


@torch.no_grad()
def nearest_neighbors(
    bank: Tensor,
    queries: Tensor,
    k: int,
    chunk_size: int = 1024,
    bank_chunk_size: int | None = DEFAULT_BANK_CHUNK,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Cosine similarities and bank indices [N_query, k] of each query's k nearest bank rows, best first.

    At most ``chunk_size`` × ``bank_chunk_size`` similarities exist at once; results are on the CPU.
    """
    if bank.shape[0] == 0:
        raise ValueError("the k-NN bank is empty: give at least one labelled training image")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(
            f"test features have {queries.shape[-1]} dimensions but the bank has {bank.shape[-1]}; "
            "extract both with the same model and representation"
        )
    device = device or bank.device
    k = min(k, bank.shape[0])
    bank_chunk = bank.shape[0] if not bank_chunk_size else max(bank_chunk_size, k)
    bank = F.normalize(bank.to(device).float(), dim=1)
    all_sims, all_idx = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start : start + chunk_size].to(device).float(), dim=1)
        best_sims, best_idx = _block_top_k(q, bank, 0, bank_chunk, k)
        for b_start in range(bank_chunk, bank.shape[0], bank_chunk):
            sims, idx = _block_top_k(q, bank, b_start, bank_chunk, k)
            best_sims, pick = torch.cat((best_sims, sims), dim=1).topk(k, dim=1)
            best_idx = torch.cat((best_idx, idx), dim=1).gather(1, pick)
        all_sims.append(best_sims.cpu())
        all_idx.append(best_idx.cpu())
    if not all_sims:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(all_sims), torch.cat(all_idx)


def _block_top_k(q: Tensor, bank: Tensor, start: int, size: int, k: int) -> tuple[Tensor, Tensor]:
    """Each query's k nearest rows in ``bank[start : start + size]``: similarities, whole-bank indices."""
    block = bank[start : start + size]
    sims, idx = (q @ block.T).topk(min(k, block.shape[0]), dim=1)
    return sims, idx + start


def weighted_vote(sims: Tensor, neighbor_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """Class scores [N, C] (float64): each neighbour adds exp(sim / T) to its class, every row scaled by
    exp(-best sim / T) — the same ranking, without the overflow of exp(sim / T) for small T (float32
    overflows below T ≈ 0.011). A class no neighbour voted for scores exactly 0, a voted one above 0."""
    sims = sims.double()
    best = sims.amax(dim=1, keepdim=True) if sims.shape[1] else sims.new_zeros(sims.shape[0], 1)
    weights = ((sims - best) / temperature).exp()
    votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return votes.scatter_add_(1, neighbor_labels.long(), weights)


def _check_bank(train_features: Tensor, train_labels: Tensor, num_classes: int | None) -> int:
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    if train_features.shape[0] == 0:
        raise ValueError("the k-NN bank is empty: give at least one labelled training image")
    if (train_labels < 0).any():
        raise ValueError(
            "the k-NN bank has unlabelled samples (label -1); use a folder with class sub-folders"
        )
    inferred = int(train_labels.max()) + 1
    if num_classes is not None and num_classes < inferred:
        raise ValueError(f"num_classes={num_classes} but the bank has label {inferred - 1}")
    return num_classes or inferred


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    bank_chunk_size: int | None = DEFAULT_BANK_CHUNK,
) -> Tensor:
    """Class scores [N_test, C] from the weighted vote of the k nearest training samples (on the CPU)."""
    num_classes = _check_bank(train_features, train_labels, num_classes)
    sims, idx = nearest_neighbors(train_features, test_features, k, chunk_size, bank_chunk_size)
    return weighted_vote(sims, train_labels.cpu()[idx], temperature, num_classes)


def topk_hits(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Rows whose target is among the ``k`` highest scores, for each k (capped at C). A score of -inf
    never counts: a class that is not a candidate (see :func:`topk_accuracy`) is not a hit by position."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    hits = (top.indices == targets.to(top.indices.device).long()[:, None]) & (top.values > -math.inf)
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def topk_accuracy(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose target is among the ``k`` highest scores, for each k (capped at C); scores
    of -inf mark classes out of the running (the k-NN vote's classes without a vote)."""
    return [100.0 * h / max(scores.shape[0], 1) for h in topk_hits(scores, targets, ks)]


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    *,
    chunk_size: int = 1024,
    bank_chunk_size: int | None = DEFAULT_BANK_CHUNK,
    device: torch.device | None = None,
) -> dict[int, tuple[float, float]]:
    """Top-1 and top-5 accuracy (percent) of the weighted k-NN classifier for each k.

    The neighbours are searched once, for the largest k, and every smaller k reuses the best of them.
    ``device`` is where the similarities are computed (default: where the features are).
    """
    if test_features.shape[0] == 0:
        raise ValueError("the k-NN test set is empty")
    if not ks or min(ks) < 1:
        raise ValueError(f"k values must be positive, got {list(ks)}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    num_classes = _check_bank(train_features, train_labels, num_classes)
    if int(test_labels.max()) >= num_classes or (test_labels < 0).any():
        raise ValueError(
            f"test labels must lie in [0, {num_classes}); relabel the test set onto the train classes"
        )
    bank_size = train_features.shape[0]
    if max(ks) > bank_size:
        log.warning(
            "k = %s: the bank has %d samples, so every k above that votes with all of them",
            ", ".join(str(k) for k in ks if k > bank_size), bank_size,
        )  # fmt: skip
    sims, idx = nearest_neighbors(train_features, test_features, max(ks), chunk_size, bank_chunk_size, device)
    neighbor_labels = train_labels.cpu().long()[idx]
    results: dict[int, tuple[float, float]] = {}
    for k in ks:
        scores = weighted_vote(sims[:, :k], neighbor_labels[:, :k], temperature, num_classes)
        # Top-5 among the classes that got a vote: with fewer than 5 voted classes (small k), the
        # unvoted ones (all at 0, in arbitrary order) are not predictions.
        scores = scores.masked_fill(scores == 0, -math.inf)
        top1, top5 = topk_accuracy(scores, test_labels.cpu())
        results[k] = (top1, top5)
    return results
