"""Where a run's records go besides log.jsonl: TensorBoard event files and an offline W&B run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dino.cli import main
from dino.config import ConfigError, load_config
from dino.train import sinks as sinks_module
from dino.train.logger import RunLogger
from dino.train.pictures import to_pixels
from dino.train.sinks import scalars_of

from .conftest import TINY_OVERRIDES


def records(run_dir, kind):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def _train_args(small_folder, out, epochs, *extra):
    return [
        "train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES, f"run.epochs={epochs}",
        "monitor.knn_every=1", f"monitor.knn_val={small_folder}", f"monitor.knn_train={small_folder}",
        "log.images=2", *extra,
    ]  # fmt: skip


def test_records_become_named_scalars():
    it = {"type": "iter", "epoch": 0, "iteration": 4, "time": 1.0, "loss": 3.5, "lr": 1e-3, "kl": 2}
    assert scalars_of(it) == {"train/loss": 3.5, "schedule/lr": 1e-3, "train/kl": 2.0}
    assert scalars_of({"type": "knn", "epoch": -1, "knn_top1": 20.0}) == {"knn/knn_top1": 20.0}
    warning = {"type": "collapse_warning", "kind": "uniform", "iteration": 3, "flag": True}
    assert scalars_of(warning) == {}  # text and booleans are not scalars; the iteration is the step
    assert scalars_of({"type": "start", "images": 48}) == {}


def test_a_failing_sink_is_turned_off_and_the_log_goes_on(tmp_path, caplog):
    class Broken:
        closed = False

        def write(self, record, step):
            raise OSError("disk full")

        def images(self, tag, pictures, step, caption):
            raise AssertionError("turned off: never called again")

        def close(self):
            Broken.closed = True

    run = RunLogger(tmp_path / "log.jsonl", progress="never", sinks=[Broken()])
    run.event("knn", epoch=-1, knn_top1=10.0)
    run.images("crops/global", np.zeros((1, 4, 4, 3), np.uint8), caption="x")
    run.event("done", epochs=1)
    run.close()
    assert Broken.closed and "Broken failed (OSError: disk full)" in caplog.text
    assert [r["type"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [
        "knn",
        "done",
    ]


def test_sink_settings_are_checked_before_any_work(monkeypatch):
    with pytest.raises(ConfigError, match="log.wandb_project"):
        load_config(None, ["log.wandb=true"])
    with pytest.raises(ConfigError, match="log.images"):
        load_config(None, ["log.images=-1"])
    cfg = load_config(None, ["log.tensorboard=true"])
    real = sinks_module.importlib.util.find_spec
    monkeypatch.setattr(
        sinks_module.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install 'dino\[tensorboard\]'"):
        sinks_module.check_sinks_available(cfg.log)


def test_pixels_are_the_normalised_images_undone():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.1]
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3)).astype(np.uint8)
    as_input = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # fmt: skip
    assert np.array_equal(to_pixels(as_input, mean, std), pixels)


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_runs_records(small_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_train_args(small_folder, out, 1, "log.tensorboard=true")) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/teacher_entropy", "train/kl", "train/images_per_s", "schedule/lr",
                "schedule/weight_decay", "schedule/momentum", "schedule/teacher_temp", "epoch/loss",
                "knn/knn_top1", "knn/knn_top5"):  # fmt: skip
        assert tag in tags["scalars"], tag
    assert {"crops/global", "crops/local", "attention/teacher"} <= set(tags["images"])
    # every iteration record, at the number of iterations done, with the value log.jsonl holds
    iters = records(out, "iter")
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["iteration"] + 1, pytest.approx(r["loss"], rel=1e-6)) for r in iters]
    lr = [e.value for e in events.Scalars("schedule/lr")]
    assert lr == [pytest.approx(r["lr"], rel=1e-6) for r in iters]
    # k-NN: the random-init baseline at step 0, then after the epoch's 3 iterations
    knn = [(e.step, e.value) for e in events.Scalars("knn/knn_top1")]
    assert knn == [
        (s, pytest.approx(r["knn_top1"], rel=1e-6)) for s, r in zip((0, 3), records(out, "knn"), strict=True)
    ]
    crops = events.Images("crops/global")
    # one grid at the start: views 1 and 2 of 2 images, 32 px each, side by side
    assert len(crops) == 1 and (crops[0].width, crops[0].height, crops[0].step) == (4 * 32, 32, 0)
    assert [image.step for image in events.Images("attention/teacher")] == [0, 3]


@pytest.mark.slow
def test_wandb_offline_writes_its_run_and_a_restart_continues_it(small_folder, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    wandb_on = ("log.wandb=true", "log.wandb_project=tests")
    assert main(_train_args(small_folder, out, 1, *wandb_on)) == 0
    wandb.teardown()  # run.finish() returns before W&B's service has written everything; a process's exit waits
    run_id = (out / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8
    first = sorted((tmp_path / "wandb_home" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    data = (first[0] / f"run-{run_id}.wandb").read_bytes()
    for tag in (b"train/loss", b"schedule/lr", b"epoch/loss", b"knn/knn_top1"):
        assert tag in data
    for r in records(out, "iter"):  # each logged loss, as the JSON text W&B stores
        assert json.dumps(r["loss"]).encode() in data
    assert list((first[0] / "files" / "media" / "images").glob("attention/*.png"))
    # launched again with more epochs: the same W&B run goes on
    assert main(_train_args(small_folder, out, 2, *wandb_on)) == 0
    wandb.teardown()
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    second_losses = [json.dumps(r["loss"]).encode() for r in records(out, "iter") if r["epoch"] == 1]
    data = next(r for r in runs if r != first[0]).joinpath(f"run-{run_id}.wandb").read_bytes()
    assert second_losses and all(loss in data for loss in second_losses)


def test_a_wandb_run_that_cannot_start_says_what_to_do(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.CommError("network unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = load_config(None, ["log.wandb=true", "log.wandb_project=p"])
    with pytest.raises(OSError, match=r"network unreachable.*WANDB_MODE=offline.*log.wandb=false"):
        sinks_module.WandbSink(tmp_path, cfg.log, {})
    assert (tmp_path / "wandb_run_id").is_file()  # the id a later launch takes up again
