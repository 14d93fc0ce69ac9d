"""End-to-end runs of the training loop on a tiny ViT and 48 real CIFAR-10 images (CPU)."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from dino import hub
from dino.cli import main
from dino.config import ConfigError, load_config
from dino.data.sample import sample_dataset
from dino.train.loop import train
from dino.train.optim import param_groups
from dino.train.setup import build_student_teacher, model_state_dict

from .conftest import TINY_OVERRIDES
from .original_dino import original_run, save_as_numpy1


def records(run_dir, kind):
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.slow
def test_training_learns_and_writes_a_run(small_folder, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        TINY_OVERRIDES
        + [
            f"data.path={small_folder}",
            f"run.output_dir={out}",
            "run.epochs=5",
            "optim.warmup_epochs=2",
            "teacher.momentum=0.9",
            "head.freeze_last_layer=0",
        ],
    )
    train(cfg)
    iters = records(out, "iter")
    assert len(iters) == 5 * 3  # 48 images / batch 16
    losses = [r["loss"] for r in iters]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the loss decreases
    ln_k = math.log(128)
    for r in iters:
        assert 0.05 * ln_k < r["teacher_entropy"] < 0.99 * ln_k  # away from both collapses
        assert r["kl"] > 0
        for key in ("lr", "weight_decay", "momentum", "teacher_temp", "images_per_s", "peak_memory_gib"):
            assert key in r
    epochs = records(out, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(5)) and all(e["bad_files"] == 0 for e in epochs)
    assert (out / "config.yaml").is_file()
    rolling = sorted(p.name for p in (out / "checkpoints").glob("last-*.pth"))
    assert rolling == ["last-000000012.pth", "last-000000015.pth"]  # keep_last = 2 of the epoch ends
    assert torch.load(out / "checkpoints" / rolling[-1], weights_only=True)["epoch"] == 5
    backbone = hub.load(out)  # teacher backbone, architecture read from the run
    state = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert set(state) == set(backbone.model.state_dict())


@pytest.mark.slow
def test_mid_epoch_resume_is_bit_exact(small_folder, tmp_path):
    """Two blocks, so that stochastic depth draws from the process's random stream (with one block its
    rate is 0), which the checkpoint restores to where it was."""
    common = TINY_OVERRIDES + [f"data.path={small_folder}", "run.deterministic=true", "run.epochs=3",
                               "model.depth=2"]  # fmt: skip
    full = tmp_path / "full"
    train(
        load_config(
            None, common + [f"run.output_dir={full}", "run.checkpoint_every_iters=4", "run.keep_last=10"]
        )
    )
    mid = full / "checkpoints" / "last-000000004.pth"  # iteration 4 = second step of epoch 1
    state = torch.load(mid, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["iteration"]) == (1, 1, 4)
    resumed = tmp_path / "resumed"
    train(load_config(None, common + [f"run.output_dir={resumed}"]), resume=mid)
    a = torch.load(full / "teacher_backbone.pth", weights_only=True)
    b = torch.load(resumed / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    last_full = torch.load(full / "checkpoints" / "last-000000009.pth", weights_only=True)
    last_resumed = torch.load(resumed / "checkpoints" / "last-000000009.pth", weights_only=True)
    assert all(torch.equal(v, last_resumed["student"][k]) for k, v in last_full["student"].items())
    assert torch.equal(last_full["dino_loss"]["center"], last_resumed["dino_loss"]["center"])


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_fresh_start_in_a_used_run_directory_sets_the_old_run_aside(small_folder, tmp_path):
    """--no-resume where a longer run left its checkpoints: the new run's own files must not be deleted
    by the rolling window (which keeps the highest iterations) nor mixed with the old ones."""
    out = tmp_path / "run"
    common = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}"]
    train(load_config(None, common + ["run.epochs=2"]))
    old_last = torch.load(out / "checkpoints" / "last-000000006.pth", weights_only=True)
    train(load_config(None, common + ["run.epochs=1", "run.seed=1"]), resume=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last-000000003.pth"]
    assert torch.load(out / "checkpoints" / "last-000000003.pth", weights_only=True)["epoch"] == 1
    assert len(records(out, "start")) == 1 and len(records(out, "epoch")) == 1  # a log of its own
    (replaced,) = out.glob("replaced-*")
    kept = torch.load(replaced / "checkpoints" / "last-000000006.pth", weights_only=True)
    assert _same_tensors(kept["teacher"], old_last["teacher"])
    assert len(records(replaced, "epoch")) == 2 and (replaced / "teacher_backbone.pth").is_file()


@pytest.mark.slow
def test_resuming_from_an_earlier_checkpoint_of_the_run_sets_its_later_ones_aside(small_folder, tmp_path):
    """Continued from iteration 3 of a run that went to 9: the later checkpoints are moved aside (else the
    rolling window would keep them over the new ones, and a crash would resume the abandoned branch);
    the run then goes through the same points again, bit for bit (deterministic)."""
    out = tmp_path / "run"
    common = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.deterministic=true",
                               "run.keep_last=10", "run.epochs=3"]  # fmt: skip
    train(load_config(None, common))
    train(load_config(None, common), resume=out / "checkpoints" / "last-000000003.pth")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last-000000003.pth", "last-000000006.pth", "last-000000009.pth"]
    (replaced,) = out.glob("replaced-*")
    for name in ("last-000000006.pth", "last-000000009.pth"):
        old = torch.load(replaced / "checkpoints" / name, weights_only=True)
        new = torch.load(out / "checkpoints" / name, weights_only=True)
        assert _same_tensors(old["teacher"], new["teacher"]), name


@pytest.mark.slow
def test_continuing_a_run_with_a_larger_batch_keeps_its_new_checkpoints_newest(small_folder, tmp_path):
    """16 images a step (3 an epoch, checkpoints last-3 and last-6), then 48 (1 an epoch): the continued
    run numbers its steps for the new length (epoch 3 ends at iteration 3), below the old files; those
    are set aside, or the rolling window would keep last-6 (epoch 2) as the newest."""
    out = tmp_path / "run"
    common = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}"]
    train(load_config(None, common + ["run.epochs=2"]))
    train(load_config(None, common + ["run.epochs=3", "run.batch_size=48"]))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last-000000003.pth"]
    assert torch.load(out / "checkpoints" / "last-000000003.pth", weights_only=True)["epoch"] == 3
    (replaced,) = out.glob("replaced-*")
    assert sorted(p.name for p in (replaced / "checkpoints").iterdir()) == [
        "last-000000003.pth",
        "last-000000006.pth",
    ]
    assert [e["epoch"] for e in records(out, "epoch")] == [0, 1, 2]  # the same run's log, continued


@pytest.mark.slow
def test_a_checkpoint_taken_at_the_last_step_of_an_epoch_resumes_with_that_epochs_end(small_folder, tmp_path):
    """Saved after the epoch's last batch but before its end (a kill during the k-NN, or a mid-epoch
    checkpoint with no epoch-end one): the epoch's end — here the previous-epoch teacher rule — must run."""
    common = TINY_OVERRIDES + [f"data.path={small_folder}", "run.deterministic=true", "run.epochs=2",
                               "teacher.mode=previous_epoch", "run.checkpoint_every_epochs=2",
                               "run.checkpoint_every_iters=3", "run.keep_last=10"]  # fmt: skip
    full = tmp_path / "full"
    train(load_config(None, common + [f"run.output_dir={full}"]))
    mid = torch.load(full / "checkpoints" / "last-000000003.pth", weights_only=True)
    assert (mid["epoch"], mid["step_in_epoch"]) == (0, 3)
    resumed = tmp_path / "resumed"
    train(
        load_config(None, common + [f"run.output_dir={resumed}"]),
        resume=full / "checkpoints" / "last-000000003.pth",
    )
    a = torch.load(full / "teacher_backbone.pth", weights_only=True)
    assert _same_tensors(a, torch.load(resumed / "teacher_backbone.pth", weights_only=True))
    assert [e["epoch"] for e in records(resumed, "epoch")] == [0, 1]


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_resumes_with_another_batch_size(small_folder, tmp_path, caplog):
    """2 steps of 16 images done; at 24 images a step the epoch goes on after 1 step (32 // 24), and the
    schedules continue from iteration 1 of the new length (2 steps an epoch)."""
    common = TINY_OVERRIDES + [f"data.path={small_folder}"]
    first = tmp_path / "first"
    train(load_config(None, common + [f"run.output_dir={first}", "run.epochs=1", "run.checkpoint_every_iters=2",
                                      "run.keep_last=10"]))  # fmt: skip
    mid = first / "checkpoints" / "last-000000002.pth"
    assert torch.load(mid, weights_only=True)["global_batch_size"] == 16
    resumed = tmp_path / "resumed"
    with caplog.at_level("WARNING"):
        train(load_config(None, common + [f"run.output_dir={resumed}", "run.epochs=3", "run.batch_size=24"]),
              resume=mid)  # fmt: skip
    assert "goes on from step 1" in caplog.text
    iters = records(resumed, "iter")
    assert [r["iteration"] for r in iters] == [1, 2, 3, 4, 5]  # 1 left of epoch 0, then 2 + 2
    assert [e["epoch"] for e in records(resumed, "epoch")] == [0, 1, 2]


def _originals_checkpoint(tmp_path):
    """The original code's full checkpoint (its numpy numbers under numpy 1's module path) of a ViT-tiny/8
    on 32 px with the boosted recipe's norm_last_layer off, after 2 of 4 epochs of 3 steps (48 images of
    16 a step): the last layer, frozen in the first epoch, has taken 3 Adam steps, the rest 6."""
    run = original_run(
        img=32, depth=1, hidden=64, bottleneck=32, niter_per_ep=3, epochs_done=2, patch_size=8, out_dim=128,
        norm_last_layer=False, batch_size_per_gpu=16, epochs=4, warmup_epochs=1, lr=0.004,
        local_crops_number=2, teacher_temp=0.05, momentum_teacher=0.99,
    )  # fmt: skip
    save_as_numpy1(run.checkpoint, tmp_path / "full.pth")
    return run, tmp_path / "full.pth"


@pytest.mark.slow
def test_the_originals_checkpoint_resumes_with_its_settings_optimiser_and_schedules(small_folder, tmp_path):
    """`dino train --resume` with the original's full checkpoint and no restated architecture: its args
    give the architecture, head and recipe, its AdamW state goes on by parameter name (each parameter's
    step count continues from its own) and the schedules at iteration 2 × 3, as main_dino.py's arrays."""
    run, full = _originals_checkpoint(tmp_path)
    out = tmp_path / "resumed"
    machine = ["data.local_crop_size=16", "data.num_workers=0", "run.log_every=1", "run.progress_bar=never"]
    assert (
        main(["train", "--resume", str(full), "--data", str(small_folder), "--output", str(out), *machine])
        == 0
    )

    cfg = load_config(out / "config.yaml")
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.depth, cfg.data.global_crop_size) == (
        "vit_tiny",
        8,
        1,
        32,
    )
    assert (cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim, cfg.head.norm_last_layer) == (
        128,
        64,
        32,
        False,
    )
    assert (cfg.run.epochs, cfg.run.batch_size, cfg.optim.lr, cfg.loss.teacher_temp) == (4, 16, 0.004, 0.05)
    iters = records(out, "iter")
    assert [r["iteration"] for r in iters] == list(range(6, 12))
    for r in iters:  # main_dino.py's arrays, for 1 process of 16 images and 3 steps an epoch
        it = r["iteration"]
        assert r["lr"] == pytest.approx(run.lr_schedule[it], rel=1e-12)
        assert r["weight_decay"] == pytest.approx(run.wd_schedule[it], rel=1e-12)
        assert r["momentum"] == pytest.approx(run.momentum_schedule[it], rel=1e-12)
    assert [e["epoch"] for e in records(out, "epoch")] == [2, 3]

    # Each parameter's Adam step count: its own from the original, plus the 6 steps taken here.
    names = {id(p): n.removeprefix("module.") for n, p in run.student.named_parameters()}
    saved = run.checkpoint["optimizer"]
    original_steps = {
        names[id(p)]: float(saved["state"][i]["step"])
        for i, p in enumerate(p for group in run.optimizer.param_groups for p in group["params"])
    }
    assert sorted(set(original_steps.values())) == [3.0, 6.0]
    student, _ = build_student_teacher(cfg, torch.device("cpu"))
    ours = [n for group in param_groups(student) for n in _names(student, group["params"])]
    final = torch.load(out / "checkpoints" / "last-000000012.pth", weights_only=True)["optimizer"]["state"]
    assert {n: float(final[i]["step"]) for i, n in enumerate(ours)} == {
        n: s + 6 for n, s in original_steps.items()
    }


def _names(model, params):
    from dino.train.setup import model_parameters

    by_id = {id(p): n for n, p in model_parameters(model).items()}
    return [by_id[id(p)] for p in params]


def test_resuming_the_originals_checkpoint_as_another_architecture_is_one_clear_error(tmp_path, capsys):
    _, full = _originals_checkpoint(tmp_path)
    data = tmp_path / "empty"  # scanned, it would stop the run with "no image files": the error comes first
    data.mkdir()
    code = main(["train", "--resume", str(full), "--data", str(data), "--output", str(tmp_path / "o"),
                 "model.arch=vit_small"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "vit_tiny/8 (32 px, 1 blocks)" in err and "vit_small/8 (32 px, 1 blocks)" in err
    assert "model.*" in err and "size mismatch" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_train_and_automatic_resume(small_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES]
    assert main(args + ["run.epochs=1"]) == 0
    first = records(out, "epoch")
    assert main(args + ["run.epochs=2"]) == 0  # same directory: continues at epoch 1
    epochs = [e["epoch"] for e in records(out, "epoch")]
    assert epochs == [0, 1] and len(first) == 1


def test_cli_refuses_bad_input_before_work(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing")]) == 2
    assert "data.path" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--output", str(tmp_path / "o"), *TINY_OVERRIDES]) == 2
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_cli_takes_overrides_before_and_after_options(capsys):
    from dino.cli import parse_args

    args = parse_args(["train", "run.epochs=2", "--output", "o", "optim.lr=0.1", "--no-resume", "run.seed=3"])
    assert args.overrides == ["run.epochs=2", "optim.lr=0.1", "run.seed=3"] and args.output == "o"
    with pytest.raises(SystemExit):
        parse_args(["train", "run.epochs=2", "--output", "o", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["presets", "run.epochs=2"])  # only train takes overrides
    # -v before or after the command; absent, not verbose
    assert parse_args(["-v", "presets"]).verbose and parse_args(["presets", "-v"]).verbose
    assert not parse_args(["presets"]).verbose


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.pretrained=/no/such/weights.pth", "/no/such/weights.pth"),
        ("model.arch=timm:no_such_model", "timm has no model 'no_such_model'"),
    ],
)
def test_bad_model_settings_stop_the_run_before_the_data(small_folder, tmp_path, monkeypatch, capsys,
                                                         override, message):  # fmt: skip
    """The models are built before the folder is scanned (and, in memory, decoded): their errors come first."""
    import dino.train.trainer as trainer

    if override.startswith("model.arch=timm"):
        pytest.importorskip("timm")

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before the models")

    monkeypatch.setattr(trainer, "build_train_data", no_data)
    out = tmp_path / "o"
    code = main(["train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES, override])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_knn_monitor_without_a_labelled_bank_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    import dino.train.data as train_data

    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted(sample_dataset("train").rglob("*.jpg"))[:24]:
        shutil.copy(image, flat / image.name)

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before the monitor's bank was checked")

    monkeypatch.setattr(train_data, "_in_memory_loader", no_decoding)
    code = main(
        ["train", "--data", str(flat), "--output", str(tmp_path / "o"), *TINY_OVERRIDES, "run.batch_size=8",
         "monitor.knn_every=1", f"monitor.knn_val={sample_dataset('val')}", "data.in_memory=true",
         "data.augment_on=device"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "monitor.knn_train" in err and "class sub-folders" in err


def test_batch_larger_than_dataset(small_folder, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(small_folder),
            "--output",
            str(tmp_path / "o"),
            *TINY_OVERRIDES,
            "run.batch_size=64",
        ]
    )
    assert code == 2 and "run.batch_size" in capsys.readouterr().err


def skip_without_c_compiler() -> None:
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")


def test_a_broken_compile_toolchain_stops_the_run_before_the_data(
    small_folder, tmp_path, monkeypatch, capsys
):
    """run.compile=true is tried on a one-line function first: the error names the way out, and neither
    the data nor the run directory are touched."""
    import dino.train.trainer as trainer

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fails

    def data_built(*args, **kwargs):
        raise AssertionError("the data were built before the toolchain check")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(trainer, "build_train_data", data_built)
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES, "run.compile=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No working C++ compiler" in err and "run.compile=false" in err and not out.exists()


def test_the_compile_check_finds_a_missing_cpp_compiler(tmp_path):
    """The real check, in a process whose inductor is pointed at a compiler that does not exist."""
    import os
    import subprocess
    import sys

    skip_without_c_compiler()
    script = "import torch; from dino.train.setup import check_compile_toolchain as c; c(torch.device('cpu'))"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode != 0 and "ConfigError" in done.stderr and "C++ compiler" in done.stderr
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # this machine's own compiler
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _torchrun(small_folder, out, extra, port, env=None, timeout=600):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "dino.cli", "train", "--data", str(small_folder), "--output", str(out), *TINY_OVERRIDES,
           "run.batch_size=8", *extra]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [r["loss"] for r in records(out, "iter")], done.stderr


def test_every_process_builds_the_same_student_and_teacher():
    """Processes seed their random streams differently (run.seed + rank, for augmentation and stochastic
    depth), but the models come from run.seed alone: DDP makes the students equal, nothing would make the
    teachers equal. And building them leaves the caller's stream where it was."""
    cfg = load_config(None, TINY_OVERRIDES)
    built = []
    for rank in (0, 1):
        torch.manual_seed(cfg.run.seed + rank)
        student, teacher = build_student_teacher(cfg, torch.device("cpu"))
        built.append((model_state_dict(student), model_state_dict(teacher), torch.rand(3)))
        torch.manual_seed(cfg.run.seed + rank)
        assert torch.equal(built[-1][2], torch.rand(3))  # the stream continues as if nothing was drawn
    for key in built[0][0]:
        assert torch.equal(built[0][0][key], built[1][0][key]), key
        assert torch.equal(built[0][1][key], built[1][1][key]), key
    assert not torch.equal(built[0][2], built[1][2])


@pytest.mark.slow
def test_two_processes_with_torchrun(small_folder, tmp_path):
    """DDP on the CPU (gloo): the data is split, gradients and the center are averaged across processes."""
    out = tmp_path / "ddp"
    # BatchNorm in the head: SyncBatchNorm runs on GPUs only, so a CPU run keeps BatchNorm per process.
    _torchrun(small_folder, out, ["run.epochs=2", "head.use_bn=true"], 29533)
    start = records(out, "start")[0]
    assert start["world_size"] == 2 and start["iters_per_epoch"] == 3  # 48 images / (2 × 8)
    state = torch.load(sorted((out / "checkpoints").glob("last-*.pth"))[-1], weights_only=True)
    assert state["iteration"] == 6 and torch.isfinite(state["dino_loss"]["center"]).all()
    assert any(key.endswith("running_mean") for key in state["student"])


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_bit_exact(small_folder, tmp_path):
    """Each process draws its own random stream (stochastic depth here); a checkpoint keeps them all and
    each process takes back its own, so a resumed two-process run ends where the uninterrupted one does.
    (Two blocks: with one, the stochastic-depth rate of its only block is 0.)"""
    same = ["run.epochs=2", "run.deterministic=true", "run.checkpoint_every_iters=2", "run.keep_last=10",
            "model.depth=2"]  # fmt: skip
    _torchrun(small_folder, tmp_path / "full", same, 29536)
    mid = tmp_path / "full" / "checkpoints" / "last-000000002.pth"
    state = torch.load(mid, weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2) and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    _torchrun(small_folder, tmp_path / "resumed", [*same, "--resume", str(mid)], 29537)
    a = torch.load(tmp_path / "full" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "teacher_backbone.pth", weights_only=True)
    assert _same_tensors(a, b)


@pytest.mark.slow
def test_an_unreadable_batch_on_one_process_does_not_hang_the_others(small_folder, tmp_path):
    """Every file of process 1's second batch is broken: it takes that step with its previous batch (the
    other process is in DDP's collectives for it) instead of skipping it and leaving the other waiting."""
    import shutil

    from dino.data.datasets import ImageFolderDataset
    from dino.train.data import ResumableSampler

    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    dataset = ImageFolderDataset(data)
    mine = [index for index, _ in ResumableSampler(len(dataset), seed=0, rank=1, world_size=2)]
    for index in mine[8:16]:  # batch 8 per process: process 1's second batch
        dataset.samples.path(index).write_bytes(b"not an image")
    losses, stderr = _torchrun(data, tmp_path / "run", ["run.epochs=1"], 29538, timeout=300)
    assert "reuses the previous batch" in stderr
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_compiled_backbones_under_ddp_give_the_eager_losses(small_folder, tmp_path):
    """run.compile with two processes (DDP wraps the student whose backbone is compiled)."""
    skip_without_c_compiler()
    same = ["run.epochs=1", "model.drop_path_rate=0.0"]  # no random drop: comparable
    eager, _ = _torchrun(small_folder, tmp_path / "eager", same, 29534)
    compiled, log = _torchrun(
        small_folder, tmp_path / "compiled", [*same, "run.compile=true"], 29535, {"TORCH_LOGS": "recompiles"}
    )
    assert "Recompiling function forward" in log  # dynamo compiled the backbones (a graph per crop size)
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", [False, True])
def test_batched_augmentation_on_the_device_trains_and_resumes_exactly(small_folder, tmp_path, in_memory):
    """data.augment_on=device: workers read bytes (or the images are decoded once and kept in memory), the
    batch is augmented as tensors (here on the CPU)."""
    common = TINY_OVERRIDES + [f"data.path={small_folder}", "data.augment_on=device", "run.deterministic=true",
                               "run.epochs=2", "run.checkpoint_every_iters=1", "run.keep_last=10",
                               f"data.in_memory={in_memory}"]  # fmt: skip
    full = tmp_path / "full"
    train(load_config(None, common + [f"run.output_dir={full}"]))
    assert len(records(full, "iter")) == 6
    resumed = tmp_path / "resumed"
    train(
        load_config(None, common + [f"run.output_dir={resumed}"]),
        resume=full / "checkpoints" / "last-000000004.pth",
    )
    a = torch.load(full / "teacher_backbone.pth", weights_only=True)
    b = torch.load(resumed / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_channels_last_for_convolutional_networks():
    from torchvision.models import resnet18

    from dino.models.vision_transformer import vit
    from dino.train.setup import memory_format_for

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert memory_format_for(resnet18(), cuda) == torch.channels_last
    assert memory_format_for(resnet18(), cpu) == torch.channels_last
    assert memory_format_for(resnet18(), torch.device("mps")) is None
    assert memory_format_for(vit("tiny", 8, img_size=32), cuda) is None
    assert memory_format_for(vit("tiny", 8, img_size=32), cpu) is None


def test_gradient_clipping_is_per_tensor():
    from dino.train.optim import clip_gradients

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    grads = [
        torch.full_like(p, 2.0) if i % 2 else torch.full_like(p, 0.01)
        for i, p in enumerate(model.parameters())
    ]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    clip_gradients(model, 1.0)
    for p, g in zip(model.parameters(), grads, strict=True):
        norm = float(g.norm())
        expected = g * (1.0 / (norm + 1e-6)) if norm > 1.0 else g  # each tensor on its own
        torch.testing.assert_close(p.grad, expected)
    assert float(model[0].bias.grad.norm()) == pytest.approx(1.0, rel=1e-5)


def _first_losses(small_folder, out, extra: list[str]) -> list[float]:
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=1"]
    train(load_config(None, overrides + ["model.drop_path_rate=0.0"] + extra))  # no random drop: comparable
    return [r["loss"] for r in records(out, "iter")]


@pytest.mark.slow
def test_compiled_and_eager_training_steps_give_the_same_losses(small_folder, tmp_path):
    skip_without_c_compiler()
    from torch._dynamo.utils import counters

    eager = _first_losses(small_folder, tmp_path / "eager", [])
    counters.clear()
    # reduce-overhead: on the CPU the same compiled graphs without CUDA graphs, with the loop marking each
    # step's start as it does for them (gpu_checks.py compares the losses with CUDA graphs on a GPU).
    compiled = _first_losses(
        small_folder, tmp_path / "compiled", ["run.compile=true", "run.compile_mode=reduce-overhead"]
    )
    assert counters["stats"]["unique_graphs"] >= 2  # the backbones really ran compiled (teacher, student)
    assert len(eager) == len(compiled) == 3
    # Same weights, same crops: the first loss agrees to float rounding, the later ones after updates too.
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_bf16_and_fp32_training_steps_agree_within_tolerance(small_folder, tmp_path):
    fp32 = _first_losses(small_folder, tmp_path / "fp32", ["run.precision=fp32"])
    bf16 = _first_losses(small_folder, tmp_path / "bf16", ["run.precision=bf16"])
    assert len(fp32) == len(bf16) == 3
    assert bf16 == pytest.approx(fp32, rel=2e-2)  # bf16 keeps 8 bits of mantissa
    assert bf16 != fp32  # the precision setting took effect


@pytest.mark.slow
def test_profile_steps_writes_the_profile_of_a_real_run(small_folder, tmp_path):
    out = tmp_path / "run"
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=2"]
    # 48 images in batches of 4: 24 steps; the profile covers steps 11-13.
    train(load_config(None, overrides + ["run.batch_size=4", "run.profile_steps=3"]))
    summary = json.loads((out / "profile.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 10
    assert summary["wall_ms_per_step"] > 0
    assert summary["device_busy_fraction"] is None  # no kernels on a CPU
    table = (out / "profile.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table  # the step's matrix products were recorded
    assert json.loads((out / "profile_trace.json").read_text())["traceEvents"]
    assert len(records(out, "iter")) > 0 and (out / "teacher_backbone.pth").is_file()  # training went on


@pytest.mark.slow
def test_a_run_shorter_than_the_profile_writes_no_profile(small_folder, tmp_path):
    out = tmp_path / "run"
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=1"]
    train(load_config(None, overrides + ["run.batch_size=16", "run.profile_steps=3"]))  # 3 steps only
    assert not (out / "profile.json").exists() and (out / "teacher_backbone.pth").is_file()


@pytest.mark.parametrize("fused", [False, True])
def test_sgd_takes_a_parameter_whose_first_gradient_comes_late(fused):
    """The head's last layer is frozen (no gradient) for the first epochs; fused SGD used to stop with a
    TypeError at its first gradient. The updates are those of PyTorch's own SGD created fresh."""
    from dino.train.optim import build_optimizer, set_schedules

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, "sgd", momentum=0.9, fused=fused)
    set_schedules(optimizer, 0.1, 1e-4)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(model.parameters(), step_grads, strict=True)):
            p.grad = None if step == 0 and i >= 2 else g.clone()  # layer 2 frozen at the first step
        optimizer.step()
    # PyTorch's SGD (for-loop), layer 2 joining at step 1 with a fresh optimizer state for it.
    params = list(reference.parameters())
    plain = torch.optim.SGD(
        [{"params": [params[0]], "weight_decay": 1e-4}, {"params": [params[1], params[3]], "weight_decay": 0.0},
         {"params": [params[2]], "weight_decay": 1e-4}], lr=0.1, momentum=0.9, foreach=False,
    )  # fmt: skip
    for step, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads, strict=True)):
            p.grad = None if step == 0 and i >= 2 else g.clone()
        plain.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_lars_follows_the_layer_wise_trust_ratio_update():
    """LARS (You et al. 2017, as in the released DINO): for weights, u = g + wd·w scaled by
    eta·‖w‖/‖u‖; biases and norms plain momentum SGD; mu ← m·mu + u; w ← w − lr·mu."""
    from dino.train.optim import build_optimizer, set_schedules

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # a zero weight: the trust ratio falls back to 1
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    mu = {name: torch.zeros_like(p) for name, p in expected.items()}
    optimizer = build_optimizer(model, "lars", momentum=0.9)
    set_schedules(optimizer, 0.3, 1e-4)
    for _ in range(3):
        grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.grad = grads[name].clone()
        optimizer.step()
        for name, w in expected.items():
            u = grads[name]
            if w.ndim > 1:
                u = u + 1e-4 * w
                w_norm, u_norm = float(w.norm()), float(u.norm())
                u = u * (0.001 * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
            mu[name] = 0.9 * mu[name] + u
            expected[name] = w - 0.3 * mu[name]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)


@pytest.mark.slow
def test_rolling_checkpoints_every_n_epochs_and_always_after_the_last(small_folder, tmp_path):
    out = tmp_path / "run"
    overrides = TINY_OVERRIDES + [f"data.path={small_folder}", f"run.output_dir={out}", "run.epochs=3",
                                  "run.checkpoint_every_epochs=2", "run.keep_last=10"]  # fmt: skip
    train(load_config(None, overrides))
    names = sorted(p.name for p in (out / "checkpoints").glob("last-*.pth"))
    assert names == ["last-000000006.pth", "last-000000009.pth"]  # 3 iterations per epoch: epochs 2 and 3
    with pytest.raises(ConfigError, match="run.checkpoint_every_epochs"):
        load_config(None, ["run.checkpoint_every_epochs=0"])
