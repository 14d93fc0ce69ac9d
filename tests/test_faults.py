"""Fault injection: kills, preemption, non-finite losses and broken files never lose a run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dino.checkpoint import CheckpointError, CheckpointManager
from dino.cli import main
from dino.config import load_config
from dino.loss import DINOLoss
from dino.models.multicrop import MultiCropWrapper
from dino.train.loop import EXIT_PREEMPTED, TrainingDiverged, train

from .conftest import TINY_OVERRIDES
from .test_checkpoint import tear

DETERMINISTIC = TINY_OVERRIDES + ["run.deterministic=true", "run.epochs=4", "run.checkpoint_every_iters=1"]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def same_weights(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def launch(data: Path, out: Path, *overrides: str, new_session: bool = False) -> subprocess.Popen:
    """``dino train`` in a child process; ``new_session``: in a process group of its own (with its loader
    workers), which a test can signal as a terminal does."""
    cmd = [
        sys.executable,
        "-m",
        "dino.cli",
        "train",
        "--data",
        str(data),
        "--output",
        str(out),
        *DETERMINISTIC,
        *overrides,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=new_session
    )


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not CheckpointManager(out).rolling():
        assert proc.poll() is None, f"training ended early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(small_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    train(load_config(None, DETERMINISTIC + [f"data.path={small_folder}", f"run.output_dir={out}"]))
    return out


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(small_folder, reference, tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        proc = launch(small_folder, out)
        wait_for_checkpoint(out, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # lands anywhere: mid-step, mid-write, between steps
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    proc = launch(small_folder, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert same_weights(reference / "teacher_backbone.pth", out / "teacher_backbone.pth")
    assert not list((out / "checkpoints").glob(".*.tmp-*"))


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(small_folder, reference, tmp_path):
    out = tmp_path / "preempted"
    proc = launch(small_folder, out)
    wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal landed: nothing to test on this machine
        pytest.fail("the run ended before SIGTERM arrived; make the run longer")
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = events(out, "preempted")
    assert stopped and stopped[0]["signal"] == "SIGTERM"
    assert CheckpointManager(out).load_latest()[0]["iteration"] == stopped[0]["iteration"]
    assert f"SIGTERM: saved {stopped[0]['checkpoint']} at iteration {stopped[0]['iteration']}" in err
    proc = launch(small_folder, out)
    assert proc.wait(timeout=300) == 0
    assert same_weights(reference / "teacher_backbone.pth", out / "teacher_backbone.pth")


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130_without_a_traceback(small_folder, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, loader workers included."""
    out = tmp_path / "interrupted"
    proc = launch(small_folder, out, "data.num_workers=1", new_session=True)
    wait_for_checkpoint(out, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run ended before Ctrl-C arrived; make the run longer")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Ctrl-C: saving a checkpoint after this step" in err
    stopped = events(out, "preempted")
    assert stopped and stopped[0]["signal"] == "SIGINT"
    assert f"SIGINT: saved {stopped[0]['checkpoint']} at iteration {stopped[0]['iteration']}" in err
    assert CheckpointManager(out).load_latest()[0]["iteration"] == stopped[0]["iteration"]


@pytest.mark.slow
def test_torn_rolling_checkpoints_resume_from_the_kept_ones_and_none_readable_stops(small_folder, tmp_path):
    out = tmp_path / "torn"
    common = TINY_OVERRIDES + [
        f"data.path={small_folder}",
        f"run.output_dir={out}",
        "run.save_every_epochs=1",
    ]
    train(load_config(None, common + ["run.epochs=2"]))  # last-3, last-6; epoch-0001, epoch-0002
    checkpoints = CheckpointManager(out)
    for path in checkpoints.rolling():
        tear(path)
    train(load_config(None, common + ["run.epochs=3"]))
    resumed = events(out, "start")[-1]["resumed_from"]
    assert resumed == {
        "checkpoint": str(checkpoints.directory / "epoch-0002.pth"),
        "epoch": 2,
        "iteration": 6,
    }
    assert [e["epoch"] for e in events(out, "epoch")] == [0, 1, 2]

    for path in checkpoints.rolling() + checkpoints.keepers():
        tear(path)
    before = sorted(p.name for p in checkpoints.directory.iterdir())
    with pytest.raises(CheckpointError, match="none of the checkpoints .* can be read .*--no-resume"):
        train(load_config(None, common + ["run.epochs=4"]))
    assert sorted(p.name for p in checkpoints.directory.iterdir()) == before  # nothing set aside or added
    assert len(events(out, "start")) == 2 and not list(out.glob("replaced-*"))


def _nan_on(calls: set[int], monkeypatch) -> None:
    original = DINOLoss.forward
    counter = {"n": 0}

    def forward(self, *args, **kwargs):
        loss, stats = original(self, *args, **kwargs)
        counter["n"] += 1
        if counter["n"] in calls:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(DINOLoss, "forward", forward)


@pytest.mark.slow
def test_isolated_nonfinite_losses_are_skipped(small_folder, tmp_path, monkeypatch):
    _nan_on({2, 5}, monkeypatch)
    out = tmp_path / "nan"
    train(
        load_config(
            None, TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=2"]
        )
    )
    assert [e["iteration"] for e in events(out, "nonfinite_loss")] == [1, 4]
    assert sum(e["skipped_steps"] for e in events(out, "epoch")) == 2
    state = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
def test_a_nan_student_forward_leaves_no_nan_batchnorm_statistics(small_folder, tmp_path, monkeypatch):
    # The student's forward updates its BatchNorm statistics (here the BN head's) before the loss is known
    # to be NaN; the skipped step must put them back, or the teacher would copy NaN statistics.
    original = MultiCropWrapper.forward
    student_calls = {"n": 0}

    def forward(self, crops):
        if len(crops) > 2:  # the student: all views
            student_calls["n"] += 1
            if student_calls["n"] == 3:
                crops = [crops[0].clone().fill_(float("nan"))] + list(crops[1:])
        return original(self, crops)

    monkeypatch.setattr(MultiCropWrapper, "forward", forward)
    out = tmp_path / "bn"
    overrides = [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=2", "head.use_bn=true"]
    train(load_config(None, TINY_OVERRIDES + overrides))
    assert [e["iteration"] for e in events(out, "nonfinite_loss")] == [2]
    state, _ = CheckpointManager(out).load_latest()
    for network in ("student", "teacher"):
        stats = {k: v for k, v in state[network].items() if "running_" in k}
        assert stats and all(torch.isfinite(v).all() for v in stats.values()), network


@pytest.mark.slow
def test_repeated_nonfinite_losses_stop_with_advice_and_keep_last_good_checkpoint(
    small_folder, tmp_path, monkeypatch
):
    _nan_on(set(range(4, 100)), monkeypatch)
    out = tmp_path / "diverged"
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=3", "run.max_bad_steps=3",
           "run.checkpoint_every_iters=1"],
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match="consecutive non-finite losses.*lr"):
        train(cfg)
    state, path = CheckpointManager(out).load_latest()
    assert state["iteration"] == 3  # the last good step; nothing written after the first bad one
    assert all(torch.isfinite(v).all() for v in state["student"].values())


def _broken_corpus(good: Path, root: Path) -> int:
    """45 good images + 3 broken files, all in one class folder layout."""
    shutil.copytree(good, root)
    victims = sorted(root.rglob("*.jpg"))[:3]
    victims[0].write_bytes(b"")  # zero bytes
    victims[1].write_bytes(victims[1].read_bytes()[:60])  # truncated JPEG
    victims[2].write_text("this is not an image")  # wrong content
    return 3


@pytest.mark.slow
def test_broken_files_are_skipped_and_counted(small_folder, tmp_path):
    data = tmp_path / "broken"
    n_bad = _broken_corpus(small_folder, data)
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        train(
            load_config(None, TINY_OVERRIDES + [f"data.path={data}", f"run.output_dir={out}", "run.epochs=1"])
        )
    assert events(out, "epoch")[0]["bad_files"] == n_bad
    assert (out / "teacher_backbone.pth").is_file()


def test_mostly_broken_folder_stops_before_training(tmp_path, capsys):
    data = tmp_path / "junk"
    data.mkdir()
    for i in range(20):
        (data / f"{i}.jpg").write_bytes(os.urandom(100))
    code = main(["train", "--data", str(data), "--output", str(tmp_path / "o"), *TINY_OVERRIDES])
    assert code == 2
    assert "cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()
