"""Weighted k-NN: the vote against hand computations, chunking, any class count and test-set size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino.eval.knn import knn_accuracy, knn_predict, nearest_neighbors, topk_accuracy, weighted_vote

# Five 2-D training points (unit vectors, some scaled: the classifier must L2-normalise) in 3 classes.
BANK = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]]) * torch.tensor(
    [[1.0], [3.0], [0.5], [2.0], [1.0]]
)
BANK_LABELS = torch.tensor([0, 1, 1, 2, 2])
QUERY = torch.tensor([[2.0, 0.0]])  # cosine similarities to the bank: 1, 0.8, 0.6, 0, -1


def test_three_class_vote_matches_hand_computation():
    # k = 3 neighbours (sims 1, 0.8, 0.6); T = 0.5: class 0 gets e^2, class 1 gets e^1.6 + e^1.2, class 2 nothing.
    # (Scores come scaled per row, by exp(-best sim / T): compare shares of the vote.)
    scores = knn_predict(BANK, BANK_LABELS, QUERY, k=3, temperature=0.5, num_classes=3)
    expected = torch.tensor([[math.exp(2.0), math.exp(1.6) + math.exp(1.2), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scores / scores.sum(), expected / expected.sum(), rtol=1e-5, atol=1e-6)
    assert scores.argmax().item() == 1  # two fairly close neighbours outvote the nearest one at T = 0.5
    # At T = 0.07 the nearest neighbour's weight dominates: e^(1/0.07) > e^(0.8/0.07) + e^(0.6/0.07).
    sharp = knn_predict(BANK, BANK_LABELS, QUERY, k=3, temperature=0.07, num_classes=3)
    assert sharp.argmax().item() == 0
    share = math.exp(1 / 0.07) / (math.exp(1 / 0.07) + math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07))
    assert (sharp[0, 0] / sharp.sum()).item() == pytest.approx(share, rel=1e-6)


def test_k_larger_than_bank_uses_every_sample():
    scores = knn_predict(BANK, BANK_LABELS, QUERY, k=50, temperature=1.0, num_classes=4)
    expected = torch.tensor(
        [[math.e, math.exp(0.8) + math.exp(0.6), math.exp(0.0) + math.exp(-1.0), 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(scores / scores.sum(), expected / expected.sum(), rtol=1e-5, atol=1e-6)


def test_accuracy_top1_top5_by_hand():
    # 7 classes on the unit circle; each test point sits next to one training point of its class.
    angles = torch.arange(7) * (2 * math.pi / 7)
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.arange(7)
    test = torch.stack([(angles[:3] + 0.1).cos(), (angles[:3] + 0.1).sin()], 1)
    test_labels = torch.tensor([0, 1, 5])  # the third one is wrong on purpose: class 5 is far from angle 2
    acc = knn_accuracy(bank, labels, test, test_labels, ks=(1, 7), temperature=0.07)
    assert acc[1][0] == pytest.approx(200 / 3)
    # k = 7: all classes vote; the 5 closest to angle 2 + 0.1 are classes 2, 3, 1, 4, 0 -> 5 is still out.
    assert acc[7][1] == pytest.approx(200 / 3)
    test_labels = torch.tensor([0, 1, 4])
    assert knn_accuracy(bank, labels, test, test_labels, ks=(7,), temperature=0.07)[7] == pytest.approx(
        (200 / 3, 100.0)
    )


def _brute_force(bank, bank_labels, queries, k, temperature, num_classes):
    """An independent numpy implementation of the paper's weighted vote."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ b.T
    scores = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        for j in order:
            scores[i, bank_labels[j]] += np.exp(sims[i, j] / temperature)
    return scores


def test_matches_independent_implementation_with_chunks():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 8, generator=g)
    bank_labels = torch.randint(0, 6, (300,), generator=g)
    queries = torch.randn(37, 8, generator=g)
    expected = _brute_force(bank.double().numpy(), bank_labels.numpy(), queries.double().numpy(), 20, 0.07, 6)
    for chunk, bank_chunk in [(1024, None), (5, 64), (1, 7), (37, 300)]:
        scores = knn_predict(
            bank, bank_labels, queries, 20, 0.07, 6, chunk_size=chunk, bank_chunk_size=bank_chunk
        )
        shares = scores / scores.sum(dim=1, keepdim=True)  # the scores are scaled per row
        np.testing.assert_allclose(shares.numpy(), expected / expected.sum(axis=1, keepdims=True), rtol=1e-4)


def test_chunked_and_unchunked_neighbours_are_identical():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(1000, 16, generator=g), torch.randn(50, 16, generator=g)
    sims_full, idx_full = nearest_neighbors(bank, queries, 25, chunk_size=1024, bank_chunk_size=None)
    sims_chunk, idx_chunk = nearest_neighbors(bank, queries, 25, chunk_size=7, bank_chunk_size=64)
    assert torch.equal(idx_full, idx_chunk)
    torch.testing.assert_close(sims_full, sims_chunk)
    assert (sims_full[:, :-1] >= sims_full[:, 1:]).all()  # best first


def test_knn_accuracy_reuses_neighbours_across_k():
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(200, 8, generator=g), torch.randn(30, 8, generator=g)
    bank_labels, test_labels = (
        torch.randint(0, 4, (200,), generator=g),
        torch.randint(0, 4, (30,), generator=g),
    )
    acc = knn_accuracy(bank, bank_labels, queries, test_labels, ks=(10, 20, 100, 200), num_classes=4)
    for k in (10, 20, 100, 200):
        scores = knn_predict(bank, bank_labels, queries, k, 0.07, 4)
        scores[scores == 0] = -math.inf  # classes without a vote are no prediction (top-5 with k < 5)
        assert acc[k] == pytest.approx(tuple(topk_accuracy(scores, test_labels)))


def test_single_test_sample_and_many_classes():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(2000, 4, generator=g)
    bank_labels = torch.arange(2000) % 1500  # far more than 1000 classes
    query = bank[1234:1235] * 5
    acc = knn_accuracy(bank, bank_labels, query, bank_labels[1234:1235], ks=(1, 20))
    assert acc[1] == (100.0, 100.0)


def test_weighted_vote_by_hand():
    sims = torch.tensor([[0.5, 0.25]])
    scores = weighted_vote(sims, torch.tensor([[1, 1]]), temperature=0.25, num_classes=2)
    # exp(sim / T) per neighbour, the row scaled by exp(-best sim / T): the best neighbour weighs 1
    expected = torch.tensor([[0.0, math.exp(2) + math.exp(1)]], dtype=torch.float64) / math.exp(2)
    torch.testing.assert_close(scores, expected)


def test_a_small_temperature_does_not_overflow_into_ties():
    """T = 0.01: exp(sim / T) overflows float32 (both weights inf, a tie the arg-max breaks for class 0);
    the nearer neighbour (class 1, cos 0.991 against 0.951) must win."""
    angle = [math.acos(0.991), math.acos(0.951)]
    bank = torch.tensor([[math.cos(a), math.sin(a)] for a in angle])
    acc = knn_accuracy(bank, torch.tensor([1, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]),
                       ks=(2,), temperature=0.01)  # fmt: skip
    assert acc[2][0] == 0.0


def test_top5_counts_only_classes_that_got_a_vote():
    """With k < 5 fewer than 5 classes get a vote; the others (all at 0, in arbitrary order) are not
    predictions: at k = 1 top-5 equals top-1, at k = 3 it is the share of queries whose class is among
    their 3 neighbours' classes."""
    g = torch.Generator().manual_seed(0)
    bank, bank_labels = torch.randn(500, 16, generator=g), torch.randint(0, 10, (500,), generator=g)
    queries, labels = torch.randn(300, 16, generator=g), torch.randint(0, 10, (300,), generator=g)
    acc = knn_accuracy(bank, bank_labels, queries, labels, ks=(1, 3))
    assert acc[1][0] == acc[1][1] < 30
    _, idx = nearest_neighbors(bank, queries, 3)
    among = (bank_labels[idx] == labels[:, None]).any(dim=1).double().mean().item() * 100
    assert acc[3][1] == pytest.approx(among) and among < 50


def test_errors_are_clear():
    with pytest.raises(ValueError, match="bank is empty"):
        knn_predict(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), QUERY)
    with pytest.raises(ValueError, match="dimensions"):
        knn_predict(BANK, BANK_LABELS, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="test set is empty"):
        knn_accuracy(BANK, BANK_LABELS, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="unlabelled"):
        knn_predict(BANK, torch.tensor([0, 1, -1, 2, 2]), QUERY)
