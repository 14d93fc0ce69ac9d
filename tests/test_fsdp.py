"""run.strategy=fsdp: sharded student and teacher, sharded checkpoints (issue 22, part A)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dino.checkpoint import CheckpointManager, load_checkpoint
from dino.config import ConfigError, load_config
from dino.hub import load
from dino.hub.export import export_backbone
from tests.conftest import TINY_OVERRIDES
from tests.test_train import records


def _train(data, out, extra, port, nproc=2, timeout=600):
    """``dino train`` on the tiny config under torchrun with ``nproc`` CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "dino.cli", "train", "--data", str(data), "--output", str(out), *TINY_OVERRIDES,
           "run.batch_size=8", "model.depth=2", "run.deterministic=true", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["iteration"]: r["loss"] for r in records(out, "iter")}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-4) for k in a)


@pytest.mark.slow
def test_fsdp_losses_and_teacher_equal_ddp_on_the_same_global_batch(small_folder, tmp_path):
    """Two processes, six steps (two epochs, the last layer frozen in the first): FSDP, with activation
    checkpointing (the blocks recomputed in the backward pass, gathered again), computes what DDP computes. The teacher's EMA runs on local shards; gathered at the end it is DDP's teacher, and the
    sharded checkpoint read whole holds DDP's student and optimiser state."""
    same = ["run.epochs=2"]
    ddp = _train(small_folder, tmp_path / "ddp", same, 29611)
    fsdp_and_checkpointing = ["run.strategy=fsdp", "model.activation_checkpointing=true"]
    fsdp = _train(small_folder, tmp_path / "fsdp", [*same, *fsdp_and_checkpointing], 29612)
    assert sorted(fsdp) == list(range(6))
    assert [fsdp[i] for i in range(6)] == pytest.approx([ddp[i] for i in range(6)], rel=1e-5)
    teacher_ddp = torch.load(tmp_path / "ddp" / "teacher_backbone.pth", weights_only=True)
    teacher_fsdp = torch.load(tmp_path / "fsdp" / "teacher_backbone.pth", weights_only=True)
    assert _close(teacher_ddp, teacher_fsdp)
    full = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last-000000006.pth")
    sharded = load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "last-000000006.dcp")
    # The key bias of attention has a zero gradient in exact arithmetic: AdamW normalises the rounding noise
    # there to steps of lr size, so reduction orders differ at 1e-5 after six steps; elsewhere far below.
    assert _close(full["student"], sharded["student"], atol=1e-4)
    assert _close(full["teacher"], sharded["teacher"], atol=1e-4)
    assert torch.allclose(full["dino_loss"]["center"], sharded["dino_loss"]["center"], atol=1e-6)
    # DDP's optimiser state is positional, in the order of the parameter groups (weights, then biases and
    # norms); the sharded one is keyed by name.
    names = [k for k, v in full["student"].items() if not (k.endswith(".bias") or v.ndim <= 1)]
    names += [k for k, v in full["student"].items() if k.endswith(".bias") or v.ndim <= 1]
    names = [n for n in names if not n.endswith("last_layer.weight_g")]  # frozen norm: no parameter
    order = [i for group in full["optimizer"]["param_groups"] for i in group["params"]]
    for i, name in zip(order, names, strict=True):
        ours, theirs = full["optimizer"]["state"][i], sharded["optimizer_by_name"][name]
        assert torch.allclose(ours["exp_avg"], theirs["exp_avg"], atol=1e-6), name
        assert torch.equal(ours["step"], theirs["step"]), name
    # A DDP checkpoint continues under FSDP: models and optimiser state (positional there) sharded as read.
    switched = _train(
        small_folder, tmp_path / "switched",
        [*same, *fsdp_and_checkpointing, "--resume", str(tmp_path / "ddp" / "checkpoints" / "last-000000003.pth")],
        29616,
    )  # fmt: skip
    assert sorted(switched) == [3, 4, 5]
    assert [switched[i] for i in (3, 4, 5)] == pytest.approx([ddp[i] for i in (3, 4, 5)], rel=1e-5)
    teacher_switched = torch.load(tmp_path / "switched" / "teacher_backbone.pth", weights_only=True)
    assert _close(teacher_ddp, teacher_switched)
    # Downstream readers take the sharded run (its newest checkpoint, read whole) as they take any other.
    assert _close(load(tmp_path / "fsdp").model.state_dict(), teacher_fsdp)
    assert _close(load(tmp_path / "fsdp", which="student").model.state_dict(), sharded_backbone(sharded))
    exported = export_backbone(tmp_path / "fsdp", "safetensors", output=tmp_path / "teacher.safetensors")
    assert _close(load(exported.path).model.state_dict(), teacher_fsdp)
    beside = export_backbone(
        tmp_path / "fsdp" / "checkpoints" / "last-000000006.dcp", "dino", which="student"
    )
    assert beside.path == tmp_path / "fsdp" / "checkpoints" / "last-000000006_student.pth"
    assert _close(torch.load(beside.path, weights_only=True), sharded_backbone(sharded))


def sharded_backbone(checkpoint: dict) -> dict[str, torch.Tensor]:
    student = checkpoint["student"]
    return {k.removeprefix("backbone."): v for k, v in student.items() if k.startswith("backbone.")}


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_two_processes_exactly_and_on_one(small_folder, tmp_path):
    """A sharded checkpoint written by two processes: two processes continue from it and end where the
    uninterrupted run ends; one process reads it whole and continues from the same point."""
    same = ["run.epochs=2", "run.strategy=fsdp", "run.checkpoint_every_iters=2", "run.keep_last=10"]
    _train(small_folder, tmp_path / "full", same, 29613)
    mid = tmp_path / "full" / "checkpoints" / "last-000000002.dcp"
    assert (mid / ".metadata").is_file() and len(list(mid.glob("*.distcp"))) == 2
    resumed = _train(small_folder, tmp_path / "two", [*same, "--resume", str(mid)], 29614)
    assert sorted(resumed) == [2, 3, 4, 5]
    a = torch.load(tmp_path / "full" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "two" / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # One process (nothing to shard): the end of epoch 0 read whole; with the same global batch (16) the
    # epoch has 3 steps, so it goes on at iteration 3 and writes an ordinary checkpoint at the end.
    epoch_end = tmp_path / "full" / "checkpoints" / "last-000000003.dcp"
    one = _train(small_folder, tmp_path / "one", [*same, "run.batch_size=16", "--resume", str(epoch_end)],
                 29615, nproc=1)  # fmt: skip
    assert sorted(one) == [3, 4, 5]
    start = records(tmp_path / "one", "start")[0]
    assert start["world_size"] == 1 and start["resumed_from"]["iteration"] == 3
    assert (tmp_path / "one" / "checkpoints" / "last-000000006.pth").is_file()


def test_fsdp_refuses_what_it_was_not_built_for():
    for override, named in [
        ("model.arch=resnet18", "vit_"),
        ("monitor.knn_every=1", "monitor.knn_every=0"),
        ("run.compile=true", "run.compile=false"),
    ]:
        with pytest.raises(ConfigError, match=named):
            load_config(None, [*TINY_OVERRIDES, "run.strategy=fsdp", override])


def _shards(value: float) -> dict:
    w = torch.full((3, 2), value)
    return {
        "student": {"backbone.w": w},
        "teacher": {"backbone.w": w / 2},
        "optimizer": {"state": {"backbone.w": {"step": torch.tensor(1.0), "exp_avg": w + 1}},
                      "param_groups": [{"lr": 0.1, "params": ["backbone.w"]}]},
    }  # fmt: skip


def test_sharded_checkpoints_roll_keep_and_fall_back(tmp_path, caplog):
    """Written in one process (no process group): the rolling window, the kept epoch copy, a damaged newest
    one passed over for the previous, and the temporary directory of an interrupted write removed."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (1, 2, 3):
        manager.save_sharded(_shards(float(it)), {"epoch": 0, "iteration": it}, it, 7 if it == 2 else None)
    names = sorted(p.name for p in manager.directory.iterdir())
    assert names == ["epoch-0007.dcp", "last-000000002.dcp", "last-000000003.dcp"]
    state, path = manager.load_latest()
    assert path.name == "last-000000003.dcp" and state["iteration"] == 3
    assert torch.equal(state["student"]["backbone.w"], torch.full((3, 2), 3.0))
    assert torch.equal(state["teacher"]["backbone.w"], torch.full((3, 2), 1.5))
    assert torch.equal(state["optimizer_by_name"]["backbone.w"]["exp_avg"], torch.full((3, 2), 4.0))
    # A shard cut short: found before anything is loaded, and the previous checkpoint is taken.
    shard = next((tmp_path / "checkpoints" / "last-000000003.dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    state, path = manager.load_latest()
    assert path.name == "last-000000002.dcp" and "falling back" in caplog.text
    lazy, _ = manager.load_latest(consolidate=False)
    assert lazy["student"]["backbone.w"].device.type == "meta" and lazy["sharded_path"] == str(path)
    # An interrupted write leaves only its temporary directory, which the next run removes.
    leftover = tmp_path / "checkpoints" / ".last-000000004.dcp.tmp-sharded"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    assert manager.load_latest()[1].name == "last-000000002.dcp"
    manager.remove_stale_temporaries()
    assert not leftover.exists()


def test_a_sharded_checkpoint_of_another_architecture_is_refused_before_reading_it(tmp_path):
    """The shapes alone (from DCP's metadata) name both architectures, as for a checkpoint file."""
    from dino.train.setup import build_student_teacher, check_architecture, model_state_dict

    student, teacher = build_student_teacher(load_config(None, TINY_OVERRIDES), torch.device("cpu"))
    shards = {"student": model_state_dict(student), "teacher": model_state_dict(teacher)}
    CheckpointManager(tmp_path).save_sharded(shards, {"epoch": 1, "iteration": 3}, 3)
    lazy, path = CheckpointManager(tmp_path).load_latest(consolidate=False)
    check_architecture(student, lazy["student"], path)  # the same: accepted
    deeper, _ = build_student_teacher(
        load_config(None, [*TINY_OVERRIDES, "model.depth=2"]), torch.device("cpu")
    )
    with pytest.raises(ConfigError, match=r"vit_tiny/8 \(32 px, 1 block"):
        check_architecture(deeper, lazy["student"], path)
