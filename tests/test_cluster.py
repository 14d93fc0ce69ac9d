"""Clusters (issue 22, part A): `dino slurm` (submitit) and torchrun's elastic restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dino.cli import main
from dino.cli.slurm import TrainingJob
from tests.conftest import TINY_OVERRIDES
from tests.test_train import records

pytest.importorskip("submitit")


def _train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(out), *TINY_OVERRIDES, "run.batch_size=8", *extra]


def test_dry_run_prints_the_batch_script_and_submits_nothing(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1-02:30:00",
                   "--account", "acct", "--qos", "high", "--dry-run", "--",
                   *_train_command(small_folder, out, "run.epochs=3")])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=acct",
                 "--qos=high", f"--time={26 * 60 + 30}", "--signal=USR2@180"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in printed, line
    assert "srun" in printed and "submitit.core._submit" in printed
    assert f"each task runs: dino train --data {small_folder} --output {out}" in printed
    assert not out.exists()  # nothing written, nothing submitted


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--time", "90"], "HH:MM:SS"),
        (["--nodes", "0"], "--nodes"),
        (["--signal-delay", "4000", "--time", "01:00:00"], "--signal-delay"),
        (["--local", "--nodes", "2"], "--nodes must be 1"),
    ],
)
def test_bad_job_options_are_refused_before_submitting(small_folder, tmp_path, capsys, options, message):
    status = main(["slurm", *options, "--dry-run", "--", *_train_command(small_folder, tmp_path / "r")])
    assert status == 2 and message in capsys.readouterr().err


def test_the_training_command_is_validated_before_submitting(small_folder, tmp_path, capsys):
    status = main(["slurm", "--dry-run", "--", *_train_command(small_folder, tmp_path / "r", "run.epochs=0")])
    assert status == 2 and "run.epochs" in capsys.readouterr().err
    assert main(["slurm", "--dry-run", "--", "knn", "--weights", "x"]) == 2
    assert "submits a training command" in capsys.readouterr().err


def test_a_requeued_job_continues_from_the_run_directory(tmp_path):
    """--resume PATH / --no-resume apply to the first start only: once the run directory has a checkpoint,
    the requeued job continues from it."""
    argv = ["train", "--output", str(tmp_path), "--no-resume", "--resume", "elsewhere.pth", "run.epochs=2"]
    job = TrainingJob(argv, str(tmp_path))
    assert job.requeue_argv() == argv  # no checkpoint yet: as first given
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last-000000004.pth").write_bytes(b"")
    assert job.requeue_argv() == ["train", "--output", str(tmp_path), "run.epochs=2"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's tasks in /proc")
def test_a_local_job_is_warned_saves_requeues_and_completes(small_folder, tmp_path):
    """submitit's local executor, two tasks on the CPU. After step 4 the tasks get SIGUSR2, the warning
    SLURM sends before the time limit or on preemption (sent here rather than by the executor's clock, so
    that it lands mid-run on a fast machine and a slow one alike): they save and stop with 75, the job
    requeues itself and resumes from the run directory, and completes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dino.cli", "slurm", "--local", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--time", "00:10:00", "--", *_train_command(small_folder, out, "run.epochs=8")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_iteration(out, 4, job)
        tasks = [pid for pid in _descendants(job.pid) if b"submitit.core._submit" in _cmdline(pid)]
        assert len(tasks) == 2, "the job's two tasks should be running"
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "done" in output, output[-3000:]
    starts = records(out, "start")
    assert len(starts) == 2 and all(s["world_size"] == 2 for s in starts)
    preempted = records(out, "preempted")
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGUSR2"
    assert starts[1]["resumed_from"]["iteration"] == preempted[0]["iteration"] >= 4
    assert records(out, "done")[0]["iterations"] == 24
    assert sorted({r["iteration"] for r in records(out, "iter")}) == list(range(24))


def _wait_for_iteration(out: Path, iteration: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "log.jsonl").exists() and any(r["iteration"] >= iteration for r in records(out, "iter")):
            return
        time.sleep(0.2)


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    return found + [d for child in found for d in _descendants(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # gone meanwhile
        pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers in /proc")
def test_torchrun_restarts_the_group_after_a_killed_process_and_resumes(small_folder, tmp_path):
    """torchrun --max-restarts=1, two CPU processes, a checkpoint every two steps: process 1 is killed
    (SIGKILL) after step 4; torchrun restarts both, they resume from the newest checkpoint and the run
    completes with every iteration done and the checkpoints of the first attempt kept."""
    out = tmp_path / "run"
    # The c10d rendezvous, as the README's many-node command.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29641", "-m", "dino.cli",
           *_train_command(small_folder, out, "run.epochs=6", "run.checkpoint_every_iters=2", "run.keep_last=20",
                           "run.strategy=fsdp")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_iteration(out, 4, launcher)
        workers = sorted(_children(launcher.pid))
        assert len(workers) == 2, "torchrun's two workers should be running"
        os.kill(workers[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    starts = records(out, "start")
    assert len(starts) == 2
    resumed = starts[1]["resumed_from"]["iteration"]
    assert resumed >= 4 and resumed % 2 == 0  # the newest checkpoint at the kill (one every two steps)
    assert records(out, "done")[0]["iterations"] == 18
    assert sorted({r["iteration"] for r in records(out, "iter")}) == list(range(18))
    kept = sorted(p.name for p in (out / "checkpoints").glob("last-*.dcp"))
    assert kept[0] == "last-000000002.dcp" and kept[-1] == "last-000000018.dcp"
