"""The benchmarks' own arithmetic (they are scripts, not part of the package: imported from benchmarks/)."""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import train_step as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def _attention(q, k, v, fused: bool):
    if fused:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return weights @ v


def test_flop_counter_counts_fused_attention_on_the_cpu(train_step):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    counts = {}
    for fused in (True, False):
        with train_step.flop_counter() as counter:
            _attention(q, k, v, fused).sum().backward()
        counts[fused] = counter.get_total_flops()
    # forward: q k^T and weights v, 2*17*17*8 multiply-adds each per head; backward: two products for each
    forward = 2 * 3 * 2 * (2 * 17 * 17 * 8)
    assert counts[False] == 3 * forward
    # the fused kernel's backward also recomputes q k^T (as PyTorch counts its GPU kernels): 5 products
    assert counts[True] == forward + forward * 5 // 2


def test_augment_operator_count_splits_device_kernels_views_and_host_work():
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import profile_gpu
    finally:
        sys.path.remove(str(BENCHMARKS))
    args = argparse.Namespace(jpegs=None, batch=3, local_crops=2)
    body, _ = profile_gpu.count_augment_ops(args, torch.device("cpu"))
    assert body["images"] == 3 and body["distinct_shapes"] == 1
    assert body["device_kernels"] > 0 and body["device_views"] > 0 and body["host"] > 0
    # The counter's split itself: an operator on a "meta" tensor is device work, a CPU one host work.
    with profile_gpu._CountOpsByDevice("meta") as counter:
        torch.ones(2, device="meta").add_(1)
        torch.ones(2).mul(2)
        torch.ones(2, device="meta").view(2, 1)
    # device: two fills (ones) and the add; host: a fill and the multiplication.
    assert counter.counts == {"device_kernels": 3, "device_views": 1, "host": 2}
