import json
import math

import pytest
import torch

from dino.train.config import load_config
from dino.train.loop import out_of_memory_advice, train
from dino.train.monitors import CollapseMonitor

from .conftest import TINY_OVERRIDES


def test_collapse_monitor_diagnoses_each_kind_once(caplog):
    k = 1000
    monitor = CollapseMonitor(k, patience=2)
    healthy = 0.5 * math.log(k)
    assert monitor.check(healthy, 0.5) == []
    assert monitor.check(0.001, 0.5) == []  # one suspicious point is not enough
    assert monitor.check(0.001, 0.5) == ["one_dimension"]
    assert monitor.check(0.001, 0.5) == []  # warned once
    assert monitor.check(math.log(k), 1e-5) == []
    assert monitor.check(math.log(k), 1e-5) == ["uniform", "no_signal"]
    assert "lower loss.teacher_temp" in caplog.text and "head.out_dim" in caplog.text


def test_collapse_monitor_streak_resets():
    monitor = CollapseMonitor(10, patience=2)
    monitor.check(0.0, 1.0)
    monitor.check(1.0, 1.0)  # healthy point in between
    assert monitor.check(0.0, 1.0) == []


def test_out_of_memory_message_names_the_knobs():
    cfg = load_config(None, [])
    with pytest.raises(RuntimeError, match="run.batch_size=64.*data.local_crops_number"):
        with out_of_memory_advice(cfg):
            raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.slow
def test_online_knn_runs_before_training_and_every_epoch(small_folder, tmp_path):
    out = tmp_path / "knn"
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=2",
                                  "monitor.knn_every=1", f"monitor.knn_val={small_folder}"]  # fmt: skip
    train(load_config(None, overrides))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if r["type"] == "knn"]
    assert [r["epoch"] for r in knn] == [-1, 0, 1]  # random-init baseline first
    # The bank is the (labelled) training folder and the queries are the same images: the nearest neighbour
    # of each query is itself, so top-1 is far above chance (25 % for 4 classes).
    assert all(60.0 <= r["knn_top1"] <= 100.0 for r in knn)
