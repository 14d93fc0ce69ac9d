"""The run log's figures: window and epoch averages, images per second, peak memory."""

from __future__ import annotations

import json
import resource

import pytest
import torch

import dino.train.logger as logger_module
from dino.config import load_config
from dino.train.distributed import DistEnv
from dino.train.logger import RunLogger, counted, peak_memory_gib


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_window_and_epoch_figures(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(logger_module.time, "perf_counter", clock)
    run = RunLogger(tmp_path / "log.jsonl", progress="never")
    run.start_epoch(0, iters=4, done=0, images_per_step=64)
    stats = {"teacher_entropy": torch.tensor(2.0), "kl": torch.tensor(0.5)}
    scalars = {"lr": 1e-3}
    for step, loss in enumerate((4.0, 2.0, float("nan"), 3.0)):
        clock.now += 0.5
        record = run.step(step, 0, 64, torch.tensor(loss), stats, log_now=step in (1, 3), **scalars)
        if step == 1:  # 2 steps × 64 images in 1 s; the mean of the window's losses
            assert record["images_per_s"] == pytest.approx(128.0) and record["loss"] == pytest.approx(3.0)
        elif step == 3:  # a non-finite loss (a skipped step) is left out of the mean
            assert record["loss"] == pytest.approx(3.0) and record["lr"] == 1e-3
        else:
            assert record is None
    clock.now += 1.0
    summary = run.end_epoch(0)
    assert summary["images_per_s"] == pytest.approx(256 / 3.0) and summary["seconds"] == pytest.approx(3.0)
    assert summary["loss"] == pytest.approx(3.0) and summary["kl"] == pytest.approx(0.5)
    run.close()
    kinds = [json.loads(line)["type"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert kinds == ["iter", "iter", "epoch"]


def test_an_event_may_carry_a_field_named_kind(tmp_path):
    # the collapse monitor's warnings say which collapse: a field named like the event's own parameter
    run = RunLogger(tmp_path / "log.jsonl", progress="never")
    run.event("collapse_warning", kind="one_dimension", iteration=3)
    run.close()
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert (record["type"], record["kind"], record["iteration"]) == ("collapse_warning", "one_dimension", 3)


def test_peak_memory_on_the_cpu_is_the_resident_peak_in_gib():
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_memory_gib(torch.device("cpu")) == pytest.approx(kib / 2**20, rel=0.01)
    assert 0.01 < peak_memory_gib(torch.device("cpu")) < 64


def test_the_progress_bar_counts_images(tmp_path, capsys):
    """The README promises images/s on the bar: it counts images, resumed mid-epoch after 1 step of 64."""
    run = RunLogger(tmp_path / "log.jsonl", progress="always")
    run.start_epoch(0, iters=4, done=1, images_per_step=64)
    stats = {"teacher_entropy": torch.tensor(2.0), "kl": torch.tensor(0.5)}
    for step in range(1, 4):
        run.step(step, 0, 64, torch.tensor(1.0), stats, log_now=False)
    assert (run._bar.n, run._bar.total) == (256, 256)  # tqdm redraws at most every 0.1 s: ask it
    run.end_epoch(0)
    run.close()
    bar = capsys.readouterr().err
    assert "64/256" in bar and "img/s" in bar


def test_counts_take_the_singular_for_one():
    assert counted(1, "epoch") == "1 epoch" and counted(0, "epoch") == "0 epochs"
    assert counted(2, "process", "processes") == "2 processes"


def test_the_start_record_says_where_a_run_resumed(tmp_path, caplog):
    cfg = load_config(None, ["run.epochs=1"])
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = RunLogger(tmp_path / "log.jsonl", progress="never")
    with caplog.at_level("INFO", logger="dino.train"):
        run.start(cfg, env, n_images=1, iters_per_epoch=1)
    resumed = {"checkpoint": "run/checkpoints/last-000000003.pth", "epoch": 1, "iteration": 3}
    run.start(cfg, env, n_images=1, iters_per_epoch=1, resumed_from=resumed)
    run.close()
    fresh, again = (json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines())
    assert fresh["resumed_from"] is None and again["resumed_from"] == resumed
    assert "1 image, 1 iteration per epoch, 1 epoch" in caplog.text
