import json
import math
import shutil

import pytest
import torch

from dino import hub
from dino.config import load_config
from dino.data.datasets import ImageFolderDataset
from dino.data.sample import sample_dataset
from dino.data.transforms import EvalTransform
from dino.eval.features import extract_features
from dino.eval.knn import knn_accuracy
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
    """Bank: the training folder; queries: other images of the same classes. The last monitor pass (after
    the last epoch) must be the k-NN accuracy of the final teacher, recomputed here from the exported
    backbone (the student, or a stale teacher, would give other numbers)."""
    val = tmp_path / "val"
    for class_dir in sorted(small_folder.iterdir()):
        (val / class_dir.name).mkdir(parents=True)
        used = {p.name for p in class_dir.iterdir()}
        spare = [
            p for p in sorted((sample_dataset("train") / class_dir.name).iterdir()) if p.name not in used
        ]
        for image in spare[:10]:
            shutil.copy(image, val / class_dir.name / image.name)
    out = tmp_path / "knn"
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=2",
                                  "monitor.knn_every=1", f"monitor.knn_val={val}"]  # fmt: skip
    cfg = load_config(None, overrides)
    train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if r["type"] == "knn"]
    assert [r["epoch"] for r in knn] == [-1, 0, 1]  # random-init baseline first
    transform = EvalTransform(resize=round(32 * 8 / 7), crop_size=32, mean=cfg.data.mean, std=cfg.data.std)
    teacher = hub.load(out).model
    cpu = torch.device("cpu")
    bank_f, bank_y = extract_features(teacher, ImageFolderDataset(small_folder, transform), cpu, 16, 0, None)
    val_f, val_y = extract_features(teacher, ImageFolderDataset(val, transform), cpu, 16, 0, None)
    top1, top5 = knn_accuracy(bank_f, bank_y, val_f, val_y, ks=(20,), num_classes=4)[20]
    assert knn[-1]["knn_top1"] == pytest.approx(top1) and knn[-1]["knn_top5"] == pytest.approx(top5)
