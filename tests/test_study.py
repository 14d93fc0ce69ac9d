"""``dino study``: the study file is checked up front, the variants train, the report is written, and a
study stopped half-way continues without training its finished variants again."""

from __future__ import annotations

import json

import pytest
import yaml

from dino.cli import main
from dino.study import StudyError, load_study, run_study, study_names
from dino.train.trainer import Preempted, Trainer

from .conftest import TINY_OVERRIDES


def _study_file(tmp_path, small_folder, variants=None, budget=None, **extra):
    spec = {
        "title": "tiny study",
        "description": "two variants of a tiny ViT",
        "overrides": TINY_OVERRIDES
        + [
            f"data.path={small_folder}",
            "monitor.knn_every=1",
            f"monitor.knn_val={small_folder}",
            "monitor.knn_student=true",
            "run.log_every=4",
        ],  # fmt: skip
        "budget": budget or {"epochs": 2},
        "variants": variants or {"DINO": [], "no centering": ["loss.teacher_norm=none"]},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _starts(run_dir):
    return [
        r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "start"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": {"hours": 1}}, "budget must name exactly one of"),
        ({"budget": {"images": -5}}, "positive number"),
        ({"variants": {"a": ["loss.teacher_temp=-1"]}}, "variant 'a': loss.teacher_temp"),
        ({"variants": {"A b": [], "a-b": []}}, "clashing"),
        ({"variants": {"a": "loss.kind=mse"}}, "list of key=value"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_a_bad_study_file_is_refused_before_training(tmp_path, small_folder, change, message):
    path = _study_file(tmp_path, small_folder)
    spec = yaml.safe_load(path.read_text())
    spec.update(change)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match=message):
        load_study(path)


def test_a_budget_in_images_becomes_epochs_over_the_training_folder(tmp_path, small_folder):
    spec = load_study(_study_file(tmp_path, small_folder, budget={"images": 150}))  # 48 images: ~3 epochs
    cfg = spec.variant_config(spec.variants[0], tmp_path / "v")
    assert cfg.run.epochs == 3 and cfg.run.output_dir == str(tmp_path / "v")
    minutes = load_study(_study_file(tmp_path, small_folder, budget={"minutes": 2.5}))
    assert minutes.variant_config(minutes.variants[0], tmp_path / "v").run.max_minutes == 2.5


def test_the_shipped_studies_are_valid():
    assert {"collapse", "teacher", "teacher_vs_student", "multicrop"} <= set(study_names())
    for name in study_names():
        spec = load_study(name)
        assert len(spec.variants) >= 1 and spec.description


@pytest.mark.slow
def test_a_study_trains_reports_and_resumes_without_retraining(tmp_path, small_folder, monkeypatch):
    path = _study_file(tmp_path, small_folder)
    out = tmp_path / "out"
    # Stop the second variant after its first epoch, as a kill or a preemption would (its checkpoint saved).
    original = Trainer.end_epoch

    def stop_in_second_variant(self):
        original(self)  # the epoch's end, its checkpoint included
        if "no-centering" in str(self.run_dir):
            raise Preempted(75)

    monkeypatch.setattr(Trainer, "end_epoch", stop_in_second_variant)
    with pytest.raises(Preempted):
        run_study(load_study(path), out)
    monkeypatch.setattr(Trainer, "end_epoch", original)
    first, second = out / "variants" / "dino", out / "variants" / "no-centering"
    assert len(_starts(first)) == 1 and len(_starts(second)) == 1

    assert main(["study", str(path), "--out", str(out)]) == 0
    assert len(_starts(first)) == 1  # finished: not trained again
    assert len(_starts(second)) == 2 and _starts(second)[1]["resumed_from"]["epoch"] == 1
    report = json.loads((out / "study.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["DINO", "no centering"]
    for v in report["variants"]:
        assert v["finished"] and v["epochs"] == 2 and v["images_seen"] == 2 * 48
        assert 0 <= v["knn_top1"] <= 100 and v["knn_random_init"] is not None
        assert v["knn_student_top1"] is not None and v["teacher_entropy"] > 0
    table = (out / "study.md").read_text()
    assert "| DINO |" in table and "| no centering |" in table and "![" in table
    for figure in ("knn.png", "collapse.png", "teacher_student.png", "curves.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same folder refuses a study whose finished variants would not compare, and takes new variants.
    (tmp_path / "other").mkdir()
    other = _study_file(tmp_path / "other", small_folder, variants={"DINO": ["loss.center_momentum=0.5"]})
    with pytest.raises(StudyError, match="variant 'DINO'"):
        run_study(load_study(other), out)
    longer = _study_file(tmp_path / "other", small_folder, budget={"epochs": 3})
    with pytest.raises(StudyError, match="budget"):
        run_study(load_study(longer), out)
    more = _study_file(tmp_path / "other", small_folder, variants={"DINO": [], "no centering": ["loss.teacher_norm=none"],
                                                                   "K=64": ["head.out_dim=64"]})  # fmt: skip
    report = run_study(load_study(more), out, only=["DINO"])  # nothing to train: DINO is finished
    assert len(_starts(first)) == 1
    assert {v.name: v.finished for v in report.variants} == {
        "DINO": True,
        "no centering": True,
        "K=64": False,
    }


def test_the_report_of_a_study_that_has_not_started(tmp_path, small_folder, capsys):
    path = _study_file(tmp_path, small_folder)
    assert main(["study", str(path), "--out", str(tmp_path / "out"), "--report-only"]) == 0
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [v["finished"] for v in report["variants"]] == [False, False]
    assert "not trained yet" in (tmp_path / "out" / "study.md").read_text()


@pytest.mark.slow
def test_variants_run_at_once_one_process_per_device_slot(tmp_path, small_folder):
    path = _study_file(tmp_path, small_folder, budget={"epochs": 1},
                       variants={"global crops only": ["data.local_crops_number=0"], "multi-crop": []})  # fmt: skip
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--devices", "cpu,cpu"]) == 0
    report = json.loads((out / "study.json").read_text())
    assert [v["finished"] for v in report["variants"]] == [True, True]
    for slug, local_crops in (("global-crops-only", 0), ("multi-crop", 2)):
        saved = yaml.safe_load((out / "variants" / slug / "config.yaml").read_text())
        assert saved["run"]["device"] == "cpu" and saved["data"]["local_crops_number"] == local_crops
        assert len(_starts(out / "variants" / slug)) == 1


def test_cpu_slots_split_the_cores_between_them(monkeypatch):
    from dino.study.runner import _child_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert _child_environment(["cpu", "cpu"])["cpu"]["OMP_NUM_THREADS"] == "4"
    assert _child_environment(["cpu", "cpu", "cpu"])["cpu"]["OMP_NUM_THREADS"] == "2"
    assert _child_environment(["cuda:0", "cuda:1"]) == {}
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert _child_environment(["cpu", "cpu", "cpu"])["cpu"]["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _child_environment(["cpu", "cpu"]) == {}
