"""The benchmarks' own arithmetic (they are scripts, not part of the package: imported from benchmarks/)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """A script of benchmarks/ imported as a module (the scripts import their neighbours by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def train_step():
    return _benchmark("train_step")


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


def _benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_end_to_end_rate_counts_only_intervals_within_an_epoch_and_outside_the_profile(tmp_path):
    import json

    end_to_end = _benchmark_module("end_to_end")
    points = [(0, 1, 10.0), (0, 3, 12.0), (0, 5, 14.0), (1, 7, 30.0), (1, 9, 31.0)]  # epoch, iteration, time
    log = tmp_path / "log.jsonl"
    lines = [{"type": "start"}] + [
        {"type": "iter", "epoch": e, "iteration": i, "time": t} for e, i, t in points
    ]
    log.write_text("\n".join(json.dumps(r) for r in lines))
    # 1→3, 3→5 (2 s each) and 7→9 (1 s); 5→7 crosses the epoch end (checkpoint, worker restart): 6 steps, 5 s.
    rate = end_to_end.steady_rate(log, images_per_step=8)
    assert rate["steps_timed"] == 6 and rate["steady_images_per_s"] == pytest.approx(6 * 8 / 5)
    # Profiled iteration 4 lies in 3→5 (iterations 4 and 5): that interval is left out.
    rate = end_to_end.steady_rate(log, images_per_step=8, exclude=(4, 4))
    assert rate["steps_timed"] == 4 and rate["seconds_timed"] == pytest.approx(3.0)


def test_data_pipeline_rate_leaves_the_loaders_backlog_untimed_and_repeats_passes():
    data_pipeline = _benchmark_module("data_pipeline")
    batches = [(index, torch.zeros(4), 0) for index in range(3)]  # (views, labels, skipped)
    timed = []
    result = data_pipeline._steady_rate(batches, torch.device("cpu"), 0.0, backlog=4, per_batch=timed.append)
    # Batches 0..4 (start-up + a backlog of 4) are not timed; the passes repeat, so the first timed batch
    # is the sixth drawn: index 5 % 3 = 2.
    assert timed == [2] and result["untimed_batches"] == 5 and result["images"] == 4
    assert data_pipeline._backlog(workers=8) == 8 * data_pipeline.PREFETCH_FACTOR


@pytest.mark.slow
def test_first_run_benchmark_trains_the_cpu_recipe_and_writes_json(small_folder, tmp_path):
    """The goal's benchmark end to end on 48 images: the CPU preset (the network made tiny), k-NN of the
    teacher, of the run's own random init and of raw pixels, in JSON."""
    import json
    import subprocess

    from .conftest import TINY_OVERRIDES

    tiny = ",".join([*TINY_OVERRIDES, "run.epochs=2", "data.in_memory=false"])
    out = tmp_path / "first_run.json"
    cmd = [sys.executable, str(BENCHMARKS / "first_run.py"), "--config", "cifar_small", "--train",
           str(small_folder), "--val", str(small_folder), "--holdout", "0", "--scratch", str(tmp_path),
           "--variant", f"tiny:{tiny}", "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    body = json.loads(out.read_text())
    assert body["config"] == "cifar_small" and body["bank"] == 48 and body["held_out"] == {"sample-val": 48}
    runs = body["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["images_seen"] == 2 * 3 * 16 for r in runs)
    for r in runs:
        assert 0 <= r["teacher"]["sample-val"] <= 100 and 0 <= r["random_init"]["sample-val"] <= 100
        # the monitor's baseline is the same network as the benchmark's random init: the same accuracy
        assert r["monitor_knn"][0] == [-1, r["random_init"]["sample-val"]]
        assert r["monitor_knn"][-1] == [1, r["teacher"]["sample-val"]]
    assert 0 < body["raw_pixels"]["sample-val"] <= 100
    summary = body["summary"]["tiny"]["sample-val"]
    gains = [r["teacher"]["sample-val"] - r["random_init"]["sample-val"] for r in runs]
    assert (summary["gain_min"], summary["gain_max"]) == (min(gains), max(gains))


@pytest.fixture(scope="module")
def teacher_lead():
    return _benchmark("teacher_lead")


def test_teacher_lead_paired_difference_and_its_standard_error(teacher_lead):
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(1000, generator=generator) < 0.4
    b = torch.rand(1000, generator=generator) < 0.35
    diff, se = teacher_lead.paired(a, b)
    per_image = a.float() - b.float()  # +1 where only a is right, -1 where only b is
    assert diff == pytest.approx(100 * per_image.mean().item(), abs=0.005)
    assert se == pytest.approx(100 * per_image.std(unbiased=False).item() / 1000**0.5, abs=0.005)
    assert teacher_lead.paired(a, a) == (0.0, 0.0)
