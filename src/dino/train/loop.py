"""The DINO training loop (Algorithm 1 of the paper), on one CPU, one GPU or many processes.

    for x in loader:                        # a batch of multi-crop views
        t = teacher(global views)           # no gradient
        s = student(all views)
        loss = H(t, s) over pairs of distinct views; update the center
        loss.backward(); optimiser step      # student only
        teacher ← EMA(teacher, student)

Helpers own the details: :mod:`dino.train.setup` builds the models, :mod:`dino.devices` picks the precision,
:mod:`dino.checkpoint` saves and restores, :mod:`dino.train.logger` logs, :mod:`dino.train.monitors`
watches for collapse and runs the online k-NN.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from dino.checkpoint import CheckpointManager, set_aside
from dino.config import DINOConfig, save_config
from dino.devices import resolve_precision
from dino.hub import load_training_checkpoint
from dino.loss import DINOLoss
from dino.teacher import TeacherUpdater
from dino.train.curves import write_run_curves
from dino.train.data import build_train_data
from dino.train.distributed import DistEnv, any_processes, barrier, cleanup, init_distributed
from dino.train.guard import BatchNormStatsKeeper, NonFiniteGuard
from dino.train.guard import TrainingDiverged as TrainingDiverged  # re-exported: callers catch it here
from dino.train.logger import RunLogger, counted, peak_memory_gib
from dino.train.monitors import CollapseMonitor
from dino.train.optim import build_optimizer, cancel_last_layer_gradients, clip_gradients, set_schedules
from dino.train.profiling import StepProfiler
from dino.train.schedules import Schedules
from dino.train.setup import (
    build_knn_monitor,
    build_student_teacher,
    check_architecture,
    check_compile_toolchain,
    gather_process_rng,
    load_model_state_dict,
    load_released_optimizer,
    restore_process_rng,
    run_state_dict,
    save_backbone,
    unwrap_compiled,
    uses_cuda_graphs,
)
from dino.train.signals import EXIT_INTERRUPTED, PreemptionGuard

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on request; launch again to resume
PREEMPTION_POLL_STEPS = 10  # with several processes, how often they agree on a stop request


class Preempted(SystemExit):
    """Saved and stopped on request: EXIT_PREEMPTED for a scheduler's signal, EXIT_INTERRUPTED for Ctrl-C."""

    def __init__(self, code: int = EXIT_PREEMPTED) -> None:
        super().__init__(code)


@dataclass
class TrainState:
    epoch: int = 0
    iteration: int = 0  # global index of the next optimiser step
    step_in_epoch: int = 0  # batches of the current epoch already done


def train(cfg: DINOConfig, resume: str | Path | bool = True) -> Path:
    """Train DINO as ``cfg`` says; returns the run directory. ``resume`` is True (continue the run in
    ``run.output_dir`` if it has a checkpoint), False, or the path of a checkpoint to continue from."""
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_minutes)
    try:
        return _train(cfg, env, resume)
    finally:
        cleanup()


def _train(cfg: DINOConfig, env: DistEnv, resume: str | Path | bool) -> Path:
    torch.manual_seed(cfg.run.seed + env.rank)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=env.device.type != "cpu")
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: cuDNN picks its fastest convolutions once
    run_dir = Path(cfg.run.output_dir).expanduser()
    if cfg.run.compile:
        check_compile_toolchain(env.device)  # before the data: in memory, they can take minutes
    # The models before the data: a missing weights file or an unknown timm name stops the run before the
    # folder is scanned and, with data.in_memory, decoded.
    precision = resolve_precision(cfg.run.precision, env.device)
    student, teacher = build_student_teacher(cfg, env.device)
    checkpoints = CheckpointManager(run_dir, cfg.run.keep_last)
    # The checkpoint too: one of another architecture stops the run before the data are read.
    restored = _restore(resume, checkpoints, env.device)
    if restored is not None:
        check_architecture(student, restored[0]["student"], restored[1])
    data = build_train_data(cfg, env.rank, env.world_size, env.device)
    dino_loss = DINOLoss(
        cfg.head.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum, cfg.loss.teacher_norm
    )
    dino_loss = dino_loss.to(env.device)
    optimizer = build_optimizer(student, cfg.optim.name, cfg.optim.momentum)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.use_scaler)
    schedules = Schedules.build(cfg, data.iters_per_epoch, env.world_size)
    teacher_rule = TeacherUpdater(cfg.teacher.mode)  # type: ignore[arg-type]
    state = TrainState()

    global_batch = cfg.run.batch_size * env.world_size
    if restored is not None:
        checkpoint, path = restored
        load_model_state_dict(student, checkpoint["student"])
        load_model_state_dict(teacher, checkpoint["teacher"])
        dino_loss.load_state_dict(checkpoint["dino_loss"])
        if checkpoint.get("fp16_scaler") is not None and precision.use_scaler:
            scaler.load_state_dict(checkpoint["fp16_scaler"])
        # A full checkpoint of the original code comes with its optimiser state keyed by parameter name
        # (its parameter order is not ours) and no random state or iteration: it continues, as the
        # original does, from the start of its next epoch.
        if "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
        elif "released_optimizer" in checkpoint:
            load_released_optimizer(optimizer, cfg.optim.name, student, checkpoint["released_optimizer"])
        if "rng" in checkpoint and not restore_process_rng(checkpoint["rng"], env.rank, env.world_size):
            log.warning(
                "the checkpoint's random state is not for %d process(es): random streams start from "
                "run.seed (the run goes on, not bit for bit as it would have)",
                env.world_size,
            )
        state = resume_point(checkpoint, data.iters_per_epoch, global_batch)
        if state.epoch >= cfg.run.epochs:
            log.warning(
                "the checkpoint is at epoch %d of run.epochs=%d: nothing left to train",
                state.epoch,
                cfg.run.epochs,
            )
        log.info("resumed from %s at epoch %d, iteration %d", path, state.epoch, state.iteration)

    barrier()  # every process has read its checkpoint before files are moved
    if env.is_main:
        replaced = _set_aside_replaced_files(run_dir, checkpoints, restored, state.iteration)
        if replaced is not None:
            log.warning("files of the run this one replaces moved to %s", replaced)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        checkpoints.remove_stale_temporaries()
    logger = RunLogger(run_dir / "log.jsonl", enabled=env.is_main, progress=cfg.run.progress_bar)
    guard = NonFiniteGuard(
        optimizer,
        env.device,
        cfg.run.max_bad_steps,
        on_bad_step=logger.bad_step,
        divergence_message=lambda n: _divergence_message(cfg, precision.name, n),
        grad_scaler_enabled=precision.use_scaler,
        teacher_mode=cfg.teacher.mode,
    )
    collapse = CollapseMonitor(cfg.head.out_dim) if cfg.monitor.collapse else None
    knn = build_knn_monitor(cfg, data.dataset) if env.is_main else None
    ddp_student = (
        DistributedDataParallel(student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.distributed
        else student
    )

    def save(epoch_keeper: int | None = None) -> Path | None:
        """The checkpoint's path on the main process; None elsewhere or when nothing was saved."""
        # Never while non-finite losses are being skipped: the last good checkpoint must stay the newest
        # (every process gets the same answer: the flags are agreed on).
        if guard.poll() != 0:
            return None
        rng = gather_process_rng(env.world_size)  # a collective: every process takes part
        if not env.is_main:
            return None
        run = run_state_dict(cfg, student, teacher, optimizer, dino_loss, scaler, state, global_batch, rng)
        return checkpoints.save(run, state.iteration, epoch_keeper)

    resumed_from = (
        None
        if restored is None
        else {"checkpoint": str(restored[1]), "epoch": state.epoch, "iteration": state.iteration}
    )
    logger.start(cfg, env, len(data.dataset), data.iters_per_epoch, resumed_from)
    # The k-NN monitor runs the teacher's backbone uncompiled: its eval mode and batch sizes would each
    # be a new graph.
    eval_backbone = unwrap_compiled(teacher.backbone)
    if knn is not None and restored is None:  # the random-initialisation baseline, logged as epoch -1
        logger.event("knn", epoch=-1, **knn.evaluate(eval_backbone, env.device, precision.autocast_dtype))
    last_save_time = time.monotonic()
    # CUDA graphs (run.compile_mode=reduce-overhead) are told where a step starts: the previous step's
    # graph outputs are dead by then and their memory can be replayed into.
    graph_steps = cfg.run.compile and uses_cuda_graphs(cfg.run.compile_mode)
    profiler = StepProfiler(cfg.run.profile_steps, run_dir, env.device, enabled=env.is_main)
    bn_stats = BatchNormStatsKeeper(student, teacher)  # empty (and skipped) for models without BatchNorm
    replacement: tuple[list[torch.Tensor], torch.Tensor] | None = None  # a batch for an unreadable one
    with PreemptionGuard(announce=env.is_main) as preemption:
        while state.epoch < cfg.run.epochs:
            epoch = state.epoch
            data.set_epoch(epoch, state.step_in_epoch, cfg.run.batch_size)
            teacher_temp = float(schedules.teacher_temp[epoch])
            logger.start_epoch(epoch, data.iters_per_epoch, state.step_in_epoch, global_batch)
            for crops, labels, n_bad in data.loader:
                logger.count_bad_files(n_bad)
                if labels.numel() == 0:  # every image of this batch failed to decode
                    if not env.distributed:
                        state.iteration += 1
                        state.step_in_epoch += 1
                        continue
                    # The other processes are about to take this step (DDP's collectives): take it too.
                    if replacement is None:
                        raise RuntimeError(
                            f"every image of batch {state.step_in_epoch} of epoch {epoch} on process "
                            f"{env.rank} failed to decode, before any batch it could stand in for; "
                            "check the data (the unreadable files are logged above)"
                        )
                    log.warning("every image of a batch failed to decode: its step reuses the previous batch")
                    crops, labels = replacement
                elif env.distributed:
                    replacement = (crops, labels)
                it = state.iteration
                set_schedules(optimizer, float(schedules.lr[it]), float(schedules.weight_decay[it]))
                crops = [c.to(env.device, non_blocking=True) for c in crops]
                if graph_steps:
                    torch.compiler.cudagraph_mark_step_begin()

                # Teacher on the global views, student on all views; cross-entropy over distinct-view pairs.
                autocast = torch.autocast(
                    env.device.type, dtype=precision.autocast_dtype, enabled=precision.autocast
                )
                if bn_stats:
                    bn_stats.save()
                with out_of_memory_advice(cfg), autocast:
                    with torch.no_grad():
                        teacher_out = teacher(crops[:2])
                    student_out = ddp_student(crops)
                    loss, stats = dino_loss(student_out, teacher_out, teacher_temp, update_center=False)

                # A non-finite loss changes nothing; the guard decides on the device where it can.
                if not guard.admit(it, loss):
                    optimizer.zero_grad(set_to_none=True)
                    if bn_stats:
                        bn_stats.restore()
                else:
                    dino_loss.update_center(teacher_out, skip=guard.mask)
                    # Student update.
                    optimizer.zero_grad(set_to_none=True)
                    with out_of_memory_advice(cfg):
                        scaler.scale(loss).backward()
                    if bn_stats and guard.on_device:  # after the backward pass, which checks their versions
                        bn_stats.restore(skip=guard.mask)
                    if cfg.optim.clip_grad > 0:
                        scaler.unscale_(optimizer)
                        clip_gradients(student, cfg.optim.clip_grad)
                    if epoch < cfg.head.freeze_last_layer:
                        cancel_last_layer_gradients(student.head)
                    teacher_rule.before_step(student)
                    scaler.step(optimizer)
                    scaler.update()
                    # Teacher update.
                    teacher_rule.after_step(teacher, student, float(schedules.momentum[it]), guard.mask)

                state.iteration += 1
                state.step_in_epoch += 1
                log_point = (it + 1) % cfg.run.log_every == 0
                record = logger.step(
                    it,
                    epoch,
                    cfg.run.batch_size * env.world_size,
                    loss=loss,
                    stats=stats,
                    lr=float(schedules.lr[it]),
                    weight_decay=float(schedules.weight_decay[it]),
                    momentum=float(schedules.momentum[it]),
                    teacher_temp=teacher_temp,
                    log_now=log_point,
                )
                if log_point:  # every process, so that all stop together on divergence
                    guard.poll()  # the log point reads values anyway: report skipped steps here
                profiler.step()
                if record is not None and collapse is not None:
                    for kind in collapse.check(record["teacher_entropy"], record["kl"]):
                        logger.event("collapse_warning", kind=kind, iteration=it)

                # A stop request and a checkpoint due by the clock are each process's own; all must take
                # the same branch (saving is a collective), and agreeing takes a collective and a host
                # sync: every few steps only.
                stop, minutes_due = preemption.requested, _minutes_due(cfg, last_save_time)
                if env.distributed:
                    agree = (it + 1) % PREEMPTION_POLL_STEPS == 0
                    stop, minutes_due = (
                        any_processes([stop, minutes_due], env.device) if agree else (False, False)
                    )
                if stop:
                    saved = save()
                    newest = None if saved else next(iter(checkpoints.rolling()), None)
                    logger.stopped(preemption.signal_name, state.iteration, saved, newest)
                    logger.close()
                    raise Preempted(EXIT_INTERRUPTED if preemption.interrupted else EXIT_PREEMPTED)
                every_iters = cfg.run.checkpoint_every_iters
                if minutes_due or (every_iters and state.iteration % every_iters == 0):
                    save()
                    last_save_time = time.monotonic()

            # End of epoch.
            guard.poll()
            teacher_rule.end_of_epoch(teacher, student)
            summary = logger.end_epoch(epoch)
            if knn is not None and cfg.monitor.knn_every and (epoch + 1) % cfg.monitor.knn_every == 0:
                summary.update(knn.evaluate(eval_backbone, env.device, precision.autocast_dtype))
                logger.event("knn", epoch=epoch, **{k: v for k, v in summary.items() if k.startswith("knn")})
            if env.is_main:
                _draw_curves(run_dir)
            state.epoch += 1
            state.step_in_epoch = 0
            keeper = (
                state.epoch
                if cfg.run.save_every_epochs and state.epoch % cfg.run.save_every_epochs == 0
                else None
            )
            if (
                keeper is not None
                or state.epoch % cfg.run.checkpoint_every_epochs == 0
                or state.epoch == cfg.run.epochs
            ):
                save(keeper)
                last_save_time = time.monotonic()

    profiler.close()
    if env.is_main:
        save_backbone(teacher.backbone, run_dir / "teacher_backbone.pth")
        logger.event(
            "done",
            epochs=state.epoch,
            iterations=state.iteration,
            peak_memory_gib=peak_memory_gib(env.device),
        )
    logger.close()
    return run_dir


def _restore(resume: str | Path | bool, checkpoints: CheckpointManager, device: torch.device):
    if resume is False:
        return None
    if resume is True:
        return checkpoints.load_latest(map_location=device)
    # ours, or a released full checkpoint of the original code
    return load_training_checkpoint(resume, map_location=device), Path(resume)


def resume_point(checkpoint: dict, iters_per_epoch: int, global_batch: int) -> TrainState:
    """Where a run continues from ``checkpoint`` with the data and batch size it has now.

    The iteration is recomputed as epoch × iterations per epoch + step, so the schedules (built for the
    current data and batch) continue where the epoch is. A checkpoint taken mid-epoch with another
    global batch size (batch size or number of processes changed) continues after as many samples as
    were done (rounded down to whole batches: a few samples come again); one taken at the last step
    of an epoch (or beyond the batches the data gives now) continues with that epoch's end (its k-NN,
    teacher rule and summary), not past it."""
    epoch = int(checkpoint["epoch"])
    step = int(checkpoint.get("step_in_epoch", 0))
    saved_batch = checkpoint.get("global_batch_size")
    if step and saved_batch is not None and int(saved_batch) != global_batch:
        samples = step * int(saved_batch)
        log.warning(
            "the checkpoint is %d steps of %d images into epoch %d; with %d images a step now, the epoch "
            "goes on from step %d",
            step, saved_batch, epoch, global_batch, samples // global_batch,
        )  # fmt: skip
        step = samples // global_batch
    if step > iters_per_epoch:
        log.warning(
            "the checkpoint is %d steps into epoch %d but the data gives %d per epoch now; "
            "finishing that epoch",
            step, epoch, iters_per_epoch,
        )  # fmt: skip
        step = iters_per_epoch
    return TrainState(epoch=epoch, iteration=epoch * iters_per_epoch + step, step_in_epoch=step)


RUN_OUTPUTS = (
    "checkpoints", "log.jsonl", "config.yaml", "teacher_backbone.pth",
    "profile.json", "profile.txt", "profile_trace.json",
)  # fmt: skip


def _set_aside_replaced_files(
    run_dir: Path, checkpoints: CheckpointManager, restored: tuple[dict, Path] | None, iteration: int
) -> Path | None:
    """Move out of the way (into ``run_dir/replaced-<time>/``) what the run would otherwise overwrite
    or take for its own: when it continues (at ``iteration``) from one of this directory's checkpoints,
    the rolling checkpoints numbered above where it goes on — later points, or, after a change of batch
    size, the same points numbered for the old length — and the periodic ones of later epochs (the
    rolling window keeps the highest numbers and resuming takes the newest, so the run would lose its
    own files to them); when it starts afresh or from a checkpoint elsewhere, the previous run's files.
    Nothing is deleted."""
    if restored is not None and _is_in(restored[1], run_dir):
        checkpoint = restored[0]
        saved = int(checkpoint.get("iteration", 0))
        later = checkpoints.newer_than(min(saved, iteration), int(checkpoint["epoch"]))
        return set_aside(run_dir, [p.relative_to(run_dir) for p in later])
    return set_aside(run_dir, RUN_OUTPUTS)


def _is_in(path: Path, run_dir: Path) -> bool:
    """``path`` is ``run_dir`` itself or one of its checkpoints."""
    path, run_dir = Path(path).resolve(), run_dir.resolve()
    return path == run_dir or path.parent == run_dir / "checkpoints"


def _draw_curves(run_dir: Path) -> None:
    """``curves.png`` from the log so far; a picture that fails to draw never stops the run."""
    try:
        write_run_curves(run_dir)
    except Exception as err:  # matplotlib missing or broken, a full disk: the training goes on
        log.warning("could not draw %s: %s", run_dir / "curves.png", err)


def _minutes_due(cfg: DINOConfig, last_save_time: float) -> bool:
    """A mid-epoch checkpoint is due by the clock (``run.checkpoint_every_minutes``)."""
    every_minutes = cfg.run.checkpoint_every_minutes
    return bool(every_minutes) and time.monotonic() - last_save_time >= every_minutes * 60


@contextlib.contextmanager
def out_of_memory_advice(cfg: DINOConfig) -> Iterator[None]:
    """Turn an out-of-memory error into one that names the knobs to turn."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise RuntimeError(
            f"out of memory at run.batch_size={cfg.run.batch_size} with {cfg.data.local_crops_number} local crops: "
            f"lower run.batch_size, data.local_crops_number or data.global_crop_size, use run.precision=bf16, "
            f"or a larger model.patch_size"
        ) from err


def _divergence_message(cfg: DINOConfig, precision: str, bad_steps: int) -> str:
    causes = []
    if precision == "fp16":
        causes.append("fp16 overflow: use run.precision=bf16 (on GPUs that support it) or fp32")
    causes.append(f"learning rate too high: lower optim.lr (now {cfg.optim.lr})")
    causes.append(f"teacher temperature: keep loss.teacher_temp ≤ 0.07 (now {cfg.loss.teacher_temp})")
    causes.append(f"gradient clipping: set optim.clip_grad (now {cfg.optim.clip_grad})")
    return (
        f"stopping after {counted(bad_steps, 'consecutive non-finite loss', 'consecutive non-finite losses')}; "
        "the last good checkpoint is kept. Likely causes: " + "; ".join(causes)
    )
