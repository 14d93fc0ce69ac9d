"""Which device each process takes (no GPU needed: CUDA's presence and device count are stubbed)."""

from __future__ import annotations

import pytest
import torch

from dino.devices import resolve_device


@pytest.fixture
def gpus(monkeypatch):
    def visible(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return visible


def test_each_torchrun_process_takes_its_local_gpu(gpus):
    gpus(4)
    assert [resolve_device("cuda", rank, 4) for rank in range(4)] == [
        torch.device("cuda", i) for i in range(4)
    ]
    assert resolve_device("auto", 2, 4) == torch.device("cuda", 2)


def test_a_launcher_that_shows_each_process_one_gpu(gpus):
    gpus(1)  # e.g. SLURM with one GPU bound per task: every LOCAL_RANK's GPU is cuda:0
    assert resolve_device("cuda", 3, 8) == torch.device("cuda", 0)


def test_more_processes_than_gpus_and_a_fixed_gpu_under_torchrun_are_refused(gpus):
    gpus(2)
    with pytest.raises(ValueError, match="--nproc_per_node"):
        resolve_device("cuda", 2, 4)
    with pytest.raises(ValueError, match="run.device=cuda:1 would put all 2 processes on one GPU"):
        resolve_device("cuda:1", 0, 2)
    assert resolve_device("cuda:1", 0, 1) == torch.device("cuda", 1)  # one process: any GPU it names


def test_no_gpu(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is visible; use run.device=cpu"):
        resolve_device("cuda:0")


def test_device_names_are_those_of_run_device():
    from dino.devices import is_device_name

    assert all(is_device_name(n) for n in ("auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"))
    assert not any(is_device_name(n) for n in ("tpu", "cuda:", "cuda:x", "cudafoo", "CPU", ""))


def test_errors_name_the_setting_the_device_came_from(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="--device=cuda:1 but no CUDA device is visible; use --device=cpu"):
        resolve_device("cuda:1", setting="--device")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")  # already resolved: unchanged


def test_training_precision(gpus):
    from dino.devices import resolve_precision

    gpus(0)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32" and not resolve_precision("auto", cpu).autocast
    assert resolve_precision("bf16", cpu).autocast_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="must be auto, fp32, bf16 or fp16"):
        resolve_precision("fp8", cpu)
