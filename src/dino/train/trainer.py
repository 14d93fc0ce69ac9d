"""The DINO training step (Algorithm 1 of the paper) and the run around it.

    for x in loader:                        # a batch of multi-crop views
        t = teacher(global views)           # no gradient
        s = student(all views)
        loss = H(t, s) over pairs of distinct views; update the center
        loss.backward(); optimiser step      # student only
        teacher ← EMA(teacher, student)

:class:`TrainingStep` is that loop's body, runnable on its own (a unit test runs it on a tiny model, no run
directory). :class:`Trainer` is the run: its setup (``__init__``: models, data, loss, optimiser,
schedules, resume), the epochs (:meth:`Trainer.train_one_epoch`) and the epoch end
(:meth:`Trainer.end_epoch`); when to save (iterations, minutes, epochs, stop requests) is
:class:`~dino.train.policy.CheckpointPolicy`'s, shared with ``dino finetune``.

Helpers own the details: :mod:`dino.train.setup` builds the models, :mod:`dino.devices` picks the precision,
:mod:`dino.checkpoint` saves, :mod:`dino.train.resume` finds where a run continues,
:mod:`dino.train.logger` logs, :mod:`dino.train.monitors` watches for collapse and runs the online k-NN.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from dino.checkpoint import CheckpointManager
from dino.config import DINOConfig, save_config
from dino.devices import Precision, resolve_precision
from dino.loss import DINOLoss
from dino.models.multicrop import MultiCropWrapper
from dino.models.vision_transformer import VisionTransformer
from dino.teacher import TeacherUpdater
from dino.train.curves import write_run_curves
from dino.train.data import build_train_data
from dino.train.distributed import DistEnv, any_processes, barrier
from dino.train.guard import BatchNormStatsKeeper, NonFiniteGuard
from dino.train.logger import RunLogger, counted, peak_memory_gib
from dino.train.monitors import CollapseMonitor
from dino.train.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    load_state_by_name,
    set_schedules,
)
from dino.train.pictures import attention_picture, crop_pictures
from dino.train.policy import EXIT_PREEMPTED as EXIT_PREEMPTED  # re-exported: callers import them here
from dino.train.policy import CheckpointPolicy
from dino.train.policy import Preempted as Preempted
from dino.train.profiling import StepProfiler
from dino.train.resume import TrainState, find_checkpoint, resume_point, set_aside_replaced_files
from dino.train.schedules import Schedules
from dino.train.setup import (
    build_knn_monitor,
    build_student_teacher,
    check_architecture,
    check_compile_toolchain,
    gather_process_rng,
    load_model_state_dict,
    load_released_optimizer,
    model_parameters,
    restore_process_rng,
    run_extras,
    run_state_dict,
    save_backbone,
    save_backbone_state,
    unwrap_compiled,
    uses_cuda_graphs,
)
from dino.train.sharding import (
    full_backbone_state,
    load_full_into_sharded,
    load_into_sharded,
    shard_models,
    sharded_tensors,
)
from dino.train.signals import PreemptionGuard
from dino.train.sinks import check_sinks_available

log = logging.getLogger(__name__)


@dataclass
class Optimisation:
    """What a step updates the student with: the DINO loss (which keeps the center), the optimiser, the
    fp16 gradient scaler (disabled in other precisions) and the schedules of lr, weight decay, teacher
    momentum and teacher temperature."""

    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules

    @classmethod
    def build(
        cls,
        cfg: DINOConfig,
        student: MultiCropWrapper,
        precision: Precision,
        device: torch.device,
        iters_per_epoch: int,
        world_size: int = 1,
    ) -> Optimisation:
        """Fresh ones, as a run starts: a zero center, the optimiser without state (lr and weight decay
        are set by the schedules at every step)."""
        lo = cfg.loss
        dino_loss = DINOLoss(cfg.head.out_dim, lo.student_temp, lo.center_momentum, lo.teacher_norm, lo.kind)
        dino_loss = dino_loss.to(device)
        optimizer = build_optimizer(student, cfg.optim.name, cfg.optim.momentum)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        return cls(dino_loss, optimizer, scaler, Schedules.build(cfg, iters_per_epoch, world_size))


class TrainingStep:
    """One iteration of Algorithm 1 on a batch of multi-crop views (:meth:`step`): the teacher on the
    global views, the student on all of them, the DINO loss, the student's update and the teacher's. A
    step whose loss is not finite changes nothing (see :mod:`dino.train.guard`).

    Args:
        cfg: the run's settings (clipping, last-layer freeze, teacher rule, limit on non-finite losses).
        student, teacher: from :func:`~dino.train.setup.build_student_teacher`.
        optimisation: from :meth:`Optimisation.build`, its state restored where a run continues.
        precision, device: the autocast dtype and where the crops go.
        on_bad_step: told ``(iteration, loss, consecutive)`` of every skipped step.
        distributed: the student's forward and backward passes run under DDP (several processes).
    """

    def __init__(
        self,
        cfg: DINOConfig,
        student: MultiCropWrapper,
        teacher: MultiCropWrapper,
        optimisation: Optimisation,
        precision: Precision,
        device: torch.device,
        on_bad_step: Callable[[int, float, int], None] | None = None,
        distributed: bool = False,
    ) -> None:
        self.cfg, self.precision, self.device = cfg, precision, device
        self.student, self.teacher = student, teacher
        self.dino_loss, self.optimizer = optimisation.dino_loss, optimisation.optimizer
        self.scaler, self.schedules = optimisation.scaler, optimisation.schedules
        self.teacher_rule = TeacherUpdater(cfg.teacher.mode)
        self.guard = NonFiniteGuard(
            self.optimizer,
            device,
            cfg.run.max_bad_steps,
            on_bad_step=on_bad_step or _warn_bad_step,
            divergence_message=lambda n: _divergence_message(cfg, precision.name, n),
            grad_scaler_enabled=precision.use_scaler,
            teacher_mode=cfg.teacher.mode,
        )
        # Empty (and skipped) for models without BatchNorm.
        self.bn_stats = BatchNormStatsKeeper(student, teacher)
        # CUDA graphs (run.compile_mode=reduce-overhead) are told where a step starts: the previous step's
        # graph outputs are dead by then and their memory can be replayed into.
        self.graph_steps = cfg.run.compile and uses_cuda_graphs(cfg.run.compile_mode)
        self.ddp_student: torch.nn.Module = (  # the student itself on one process
            DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
            if distributed
            else student
        )

    @classmethod
    def from_config(cls, cfg: DINOConfig, device: torch.device, iters_per_epoch: int = 1) -> TrainingStep:
        """A step with new models and a fresh optimiser, as a run starts them (one process, no run
        directory): for tests and benchmarks."""
        precision = resolve_precision(cfg.run.precision, device)
        student, teacher = build_student_teacher(cfg, device)
        optimisation = Optimisation.build(cfg, student, precision, device, iters_per_epoch)
        return cls(cfg, student, teacher, optimisation, precision, device)

    def step(
        self, crops: list[torch.Tensor], iteration: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Train on ``crops`` (the global views first) at ``iteration`` of ``epoch``; returns the loss and
        its diagnostics (teacher entropy, KL), left on the device: nothing here waits for them."""
        crops = self._start(crops, iteration)
        with out_of_memory_advice(self.cfg), self._autocast():
            # Teacher on the global views (no gradient), student on all views.
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.ddp_student(crops)
            # Cross-entropy between them over the pairs of distinct views.
            teacher_temp = float(self.schedules.teacher_temp[epoch])
            loss, stats = self.dino_loss(student_out, teacher_out, teacher_temp, update_center=False)
        # A non-finite loss changes nothing; the guard decides on the device where it can.
        if not self.guard.admit(iteration, loss):
            self._undo_forward()
            return loss, stats
        # Center update: an EMA of the teacher's batch mean.
        self.dino_loss.update_center(teacher_out, skip=self.guard.mask)
        # Backward pass (the student only).
        self._backward(loss)
        # Gradient clipping, per tensor (after unscaling fp16 gradients).
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.student, self.cfg.optim.clip_grad)
        # The head's last layer stays frozen during the first epochs.
        if epoch < self.cfg.head.freeze_last_layer:
            cancel_last_layer_gradients(self.student.head)
        # Optimiser step.
        self.teacher_rule.before_step(self.teacher, self.student)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Teacher update: EMA of the student (or the ablation's rule, teacher.mode).
        momentum = float(self.schedules.momentum[iteration])
        self.teacher_rule.after_step(self.teacher, self.student, momentum, self.guard.mask)
        return loss, stats

    def _start(self, crops: list[torch.Tensor], iteration: int) -> list[torch.Tensor]:
        """This iteration's lr and weight decay; the crops on the device; the BatchNorm statistics kept
        for a step that turns out to be skipped."""
        lr, weight_decay = float(self.schedules.lr[iteration]), float(self.schedules.weight_decay[iteration])
        set_schedules(self.optimizer, lr, weight_decay)
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        if self.graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        if self.bn_stats:
            self.bn_stats.save()
        return crops

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with out_of_memory_advice(self.cfg):
            self.scaler.scale(loss).backward()
        if self.bn_stats and self.guard.on_device:  # after the backward pass, which checks their versions
            self.bn_stats.restore(skip=self.guard.mask)

    def _undo_forward(self) -> None:
        """A skipped step: no gradients left behind, the BatchNorm statistics as they were."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.bn_stats:
            self.bn_stats.restore()

    def _autocast(self) -> torch.autocast:
        p = self.precision
        return torch.autocast(self.device.type, dtype=p.autocast_dtype, enabled=p.autocast)


class Trainer:
    """A DINO run on one process of ``env``: set up by the constructor (models, data, loss, optimiser,
    schedules, the checkpoint to resume from), run by :meth:`fit`.

    The constructor checks what can fail before any expensive work: the compile toolchain, the models and
    the checkpoint before the data (decoding a dataset into memory can take minutes)."""

    def __init__(self, cfg: DINOConfig, env: DistEnv, resume: str | Path | bool = True) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.output_dir).expanduser()
        self.global_batch = cfg.run.batch_size * env.world_size
        _seed_and_pick_kernels(cfg, env)
        if cfg.run.compile:
            check_compile_toolchain(env.device)  # before the data: in memory, they can take minutes
        if env.is_main:
            check_sinks_available(cfg.log)  # TensorBoard, W&B installed
        # The models before the data: a missing weights file or an unknown timm name stops the run before the
        # folder is scanned and, with data.in_memory, decoded.
        self.precision = resolve_precision(cfg.run.precision, env.device)
        self.student, self.teacher = build_student_teacher(cfg, env.device)
        # run.strategy=fsdp: both models sharded over the processes (one process has nothing to shard).
        self.sharded = cfg.run.strategy == "fsdp" and env.distributed
        if self.sharded:
            shard_models(self.student, self.teacher, env.world_size, env.device, self.precision)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.run.keep_last)
        # The checkpoint too: one of another architecture stops the run before the data are read. (A sharded
        # run reads only its own slices of a sharded checkpoint, in _resume.)
        restored = find_checkpoint(resume, self.checkpoints, env.device, consolidate=not self.sharded)
        if restored is not None:
            check_architecture(self.student, restored[0]["student"], restored[1])
        self.data = build_train_data(cfg, env.rank, env.world_size, env.device)
        self.optimisation = Optimisation.build(
            cfg, self.student, self.precision, env.device, self.data.iters_per_epoch, env.world_size
        )
        self.state = TrainState()
        self.resumed_from: dict[str, object] | None = None  # where a resumed run continues (logged)
        if restored is not None:
            self._resume(*restored)
        barrier()  # every process has read its checkpoint before files are moved
        if env.is_main:
            self._prepare_run_directory(restored)
        self.logger = RunLogger.for_run(self.run_dir, cfg, env.is_main, cfg.run.progress_bar)
        self._crops_shown = False
        self.time_is_up = False  # run.max_minutes spent (read at the start and at each epoch end)
        self.collapse = CollapseMonitor(cfg.head.out_dim) if cfg.monitor.collapse else None
        # Every process runs the k-NN monitor: each extracts its block of the images (dino.eval.sharding).
        self.knn = build_knn_monitor(cfg, self.data.dataset)
        self.training_step = TrainingStep(
            cfg, self.student, self.teacher, self.optimisation, self.precision, env.device,
            on_bad_step=self.logger.bad_step, distributed=env.distributed and not self.sharded,
        )  # fmt: skip
        self.guard = self.training_step.guard
        self.profiler = StepProfiler(cfg.run.profile_steps, self.run_dir, env.device, enabled=env.is_main)
        self.policy = CheckpointPolicy(cfg.run, env, self.checkpoints, self._save)
        self._last_tick = time.monotonic()
        self._stand_in: list[torch.Tensor] | None = None  # crops for a batch that could not be read

    # Setup.

    def _resume(self, checkpoint: dict, path: Path) -> None:
        """Load ``checkpoint`` (read from ``path``) into the models, the center, the optimiser, the scaler
        and the random streams; ``state`` becomes the point where the run goes on."""
        cfg, env, o = self.cfg, self.env, self.optimisation
        if self.sharded:
            self._resume_sharded(checkpoint)
        else:
            self._resume_models_and_optimiser(checkpoint)
        o.dino_loss.load_state_dict(checkpoint["dino_loss"])
        if checkpoint.get("fp16_scaler") is not None and self.precision.use_scaler:
            o.scaler.load_state_dict(checkpoint["fp16_scaler"])
        if "rng" in checkpoint and not restore_process_rng(checkpoint["rng"], env.rank, env.world_size):
            log.warning(
                "the checkpoint's random state is not for %d process(es): random streams start from "
                "run.seed (the run goes on, not bit for bit as it would have)",
                env.world_size,
            )
        state = resume_point(checkpoint, self.data.iters_per_epoch, self.global_batch)
        if state.epoch >= cfg.run.epochs:
            log.warning(
                "the checkpoint is at epoch %d of run.epochs=%d: nothing left to train",
                state.epoch,
                cfg.run.epochs,
            )
        log.info("resumed from %s at epoch %d, iteration %d", path, state.epoch, state.iteration)
        self.state = state
        self.resumed_from = {"checkpoint": str(path), "epoch": state.epoch, "iteration": state.iteration}

    def _resume_models_and_optimiser(self, checkpoint: dict) -> None:
        """Student, teacher and optimiser of an unsharded run. A full checkpoint of the original code comes
        with its optimiser state keyed by parameter name (its parameter order is not ours) and no random
        state or iteration: it continues, as the original does, from the start of its next epoch."""
        o = self.optimisation
        load_model_state_dict(self.student, checkpoint["student"])
        load_model_state_dict(self.teacher, checkpoint["teacher"])
        if "optimizer" in checkpoint:
            o.optimizer.load_state_dict(checkpoint["optimizer"])
        elif "optimizer_by_name" in checkpoint:
            load_state_by_name(o.optimizer, model_parameters(self.student), checkpoint["optimizer_by_name"])
        elif "released_optimizer" in checkpoint:
            load_released_optimizer(
                o.optimizer, self.cfg.optim.name, self.student, checkpoint["released_optimizer"]
            )

    def _resume_sharded(self, checkpoint: dict) -> None:
        """The models and optimiser of a sharded run from ``checkpoint``: a sharded checkpoint's slices
        (each process reads its own), or a whole one (an unsharded run's, a released one) sharded as read."""
        o = self.optimisation
        if "sharded_path" in checkpoint:
            load_into_sharded(Path(checkpoint["sharded_path"]), self.student, self.teacher, o.optimizer)
            return
        released = checkpoint.get("released_optimizer")
        if released is not None and released["name"] == self.cfg.optim.name:
            checkpoint = {**checkpoint, "optimizer_by_name": released["state"]}
        names = {id(p): name for name, p in model_parameters(self.student).items()}
        in_order = [names[id(p)] for group in o.optimizer.param_groups for p in group["params"]]
        load_full_into_sharded(checkpoint, self.student, self.teacher, o.optimizer, in_order)

    def _prepare_run_directory(self, restored: tuple[dict, Path] | None) -> None:
        """The run directory, with the files of a run this one replaces moved aside and the config saved."""
        replaced = set_aside_replaced_files(self.run_dir, self.checkpoints, restored, self.state.iteration)
        if replaced is not None:
            log.warning("files of the run this one replaces moved to %s", replaced)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        self.checkpoints.remove_stale_temporaries()

    # The run.

    def fit(self) -> Path:
        """Train from ``state`` to ``run.epochs``, then save the teacher's backbone; returns the run
        directory. Raises :class:`Preempted` after saving on a stop request (a signal, Ctrl-C)."""
        cfg, env = self.cfg, self.env
        self.logger.start(cfg, env, len(self.data.dataset), self.data.iters_per_epoch, self.resumed_from)
        if self.knn is not None and self.resumed_from is None:  # the random-initialisation baseline: epoch -1
            self.logger.event("knn", epoch=-1, **self._evaluate_knn())
            self._show_attention("random init")
        self.policy.restart_clock()
        self._last_tick = time.monotonic()
        with PreemptionGuard(announce=env.is_main) as preemption:
            self.time_is_up = self._time_is_up()  # a resumed run may have spent its minutes already
            while self.state.epoch < cfg.run.epochs and not self.time_is_up:
                self.train_one_epoch(preemption)
                self.end_epoch()
        self.profiler.close()
        self._save_teacher_backbone()
        if env.is_main:
            self.logger.event(
                "done",
                epochs=self.state.epoch,
                iterations=self.state.iteration,
                peak_memory_gib=peak_memory_gib(env.device),
                train_seconds=round(self.state.train_seconds, 1),
                stopped_by="time limit" if self.state.epoch < cfg.run.epochs else "epochs",
            )
        self.logger.close()
        return self.run_dir

    def _save_teacher_backbone(self) -> None:
        """``teacher_backbone.pth`` from the first process (a sharded teacher is gathered from all first)."""
        path = self.run_dir / "teacher_backbone.pth"
        if self.sharded:
            state = full_backbone_state(self.teacher)  # a collective
            if self.env.is_main:
                save_backbone_state(state, path)
        elif self.env.is_main:
            save_backbone(self.teacher.backbone, path)

    def train_one_epoch(self, preemption: PreemptionGuard) -> None:
        """The steps of epoch ``state.epoch`` from ``state.step_in_epoch`` on, each followed by its log
        record and the checkpoint policy."""
        state, epoch = self.state, self.state.epoch
        self.data.set_epoch(epoch, state.step_in_epoch, self.cfg.run.batch_size)
        self.logger.start_epoch(epoch, self.data.iters_per_epoch, state.step_in_epoch, self.global_batch)
        for crops, labels, n_bad in self.data.loader:
            self.logger.count_bad_files(n_bad)
            batch = self._batch_or_stand_in(crops, labels)
            if batch is None:  # every image of this batch failed to decode: one process skips its step
                state.iteration += 1
                state.step_in_epoch += 1
                continue
            it = state.iteration
            if not self._crops_shown:
                self._show_crops(batch)
            loss, stats = self.training_step.step(batch, it, epoch)
            state.iteration += 1
            state.step_in_epoch += 1
            self._record_step(it, epoch, loss, stats)
            self.policy.after_step(it, state.iteration, preemption, self.logger)

    def _batch_or_stand_in(
        self, crops: list[torch.Tensor], labels: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """The crops to train on: the batch's own, or, when every image failed to decode, None (one process:
        the step is skipped) or the previous batch's (several processes)."""
        if labels.numel() > 0:
            if self.env.distributed:
                self._stand_in = crops
            return crops
        if not self.env.distributed:
            return None
        # The other processes are about to take this step (DDP's collectives): take it too.
        if self._stand_in is None:
            raise RuntimeError(
                f"every image of batch {self.state.step_in_epoch} of epoch {self.state.epoch} on process "
                f"{self.env.rank} failed to decode, before any batch it could stand in for; "
                "check the data (the unreadable files are logged above)"
            )
        log.warning("every image of a batch failed to decode: its step reuses the previous batch")
        return self._stand_in

    def _record_step(self, it: int, epoch: int, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Log step ``it`` (read on the host every ``run.log_every`` steps only); profile it; watch for
        collapse."""
        schedules = self.optimisation.schedules
        log_point = (it + 1) % self.cfg.run.log_every == 0
        record = self.logger.step(
            it,
            epoch,
            self.global_batch,
            loss=loss,
            stats=stats,
            lr=float(schedules.lr[it]),
            weight_decay=float(schedules.weight_decay[it]),
            momentum=float(schedules.momentum[it]),
            teacher_temp=float(schedules.teacher_temp[epoch]),
            log_now=log_point,
        )
        if log_point:  # every process, so that all stop together on divergence
            self.guard.poll()  # the log point reads values anyway: report skipped steps here
        self.profiler.step()
        if record is not None and self.collapse is not None:
            for kind in self.collapse.check(record["teacher_entropy"], record["kl"]):
                self.logger.event("collapse_warning", kind=kind, iteration=it)

    # Checkpoints (when: :class:`~dino.train.policy.CheckpointPolicy`).

    def _time_is_up(self) -> bool:
        """``run.max_minutes`` of training are done (the same answer on every process: the first's)."""
        limit = self.cfg.run.max_minutes
        if not limit:
            return False
        up = self.state.train_seconds >= limit * 60
        return any_processes([up], self.env.device)[0] if self.env.distributed else up

    def _tick(self) -> None:
        """Add the wall time since the last tick to ``state.train_seconds`` (saved with the checkpoints)."""
        now = time.monotonic()
        self.state.train_seconds += now - self._last_tick
        self._last_tick = now

    def _save(self, epoch_keeper: int | None = None) -> Path | None:
        """The checkpoint's path on the main process; None elsewhere or when nothing was saved."""
        # Never while non-finite losses are being skipped: the last good checkpoint must stay the newest
        # (every process gets the same answer: the flags are agreed on).
        if self.guard.poll() != 0:
            return None
        self._tick()
        rng = gather_process_rng(self.env.world_size)  # a collective: every process takes part
        o = self.optimisation
        if self.sharded:  # every process writes its shards
            extra = (
                run_extras(self.cfg, o.dino_loss, o.scaler, self.state, self.global_batch, rng)
                if self.env.is_main
                else None
            )
            shards = sharded_tensors(self.student, self.teacher, o.optimizer)
            path = self.checkpoints.save_sharded(shards, extra, self.state.iteration, epoch_keeper)
            return path if self.env.is_main else None
        if not self.env.is_main:
            return None
        run = run_state_dict(
            self.cfg, self.student, self.teacher, o.optimizer, o.dino_loss, o.scaler, self.state,
            self.global_batch, rng,
        )  # fmt: skip
        return self.checkpoints.save(run, self.state.iteration, epoch_keeper)

    # The epoch end.

    def end_epoch(self) -> None:
        """After the last step of an epoch: the teacher rule's epoch end, the epoch's summary, the k-NN
        monitor when due, ``curves.png``, then the epoch's checkpoint."""
        epoch = self.state.epoch
        self.guard.poll()
        self.training_step.teacher_rule.end_of_epoch(self.teacher, self.student)
        summary = self.logger.end_epoch(epoch)
        every = self.cfg.monitor.knn_every
        if self.knn is not None and every and (epoch + 1) % every == 0:
            summary.update(self._evaluate_knn())
            self.logger.event("knn", epoch=epoch, **{k: v for k, v in summary.items() if k.startswith("knn")})
            self._show_attention(f"after epoch {epoch}")
        if self.env.is_main:
            _draw_curves(self.run_dir)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self._tick()
        # Read once: the loop stops exactly when this epoch end's checkpoint was forced as the last one
        # (the save itself adds to the training time).
        self.time_is_up = self._time_is_up()
        self.policy.at_epoch_end(self.state.epoch, final=self.time_is_up)

    def _show_crops(self, crops: list[torch.Tensor]) -> None:
        """The run's first batch of augmented crops, for the sinks that show pictures (``log.images``)."""
        self._crops_shown = True
        n = self.cfg.log.images
        if not (n and self.logger.shows_images):
            return
        d = self.cfg.data
        with _pictures_never_stop_training("the first batch's crops"):
            for tag, pictures in crop_pictures(crops, d.mean, d.std, n).items():
                self.logger.images(tag, pictures, caption="augmented crops of the first batch")

    def _show_attention(self, when: str) -> None:
        """The teacher's [CLS] attention on the first held-out image of the k-NN monitor (ViTs only)."""
        backbone = unwrap_compiled(self.teacher.backbone)
        if not (self.cfg.log.images and self.logger.shows_images and self.knn is not None):
            return
        if not isinstance(backbone, VisionTransformer):
            return  # a convolutional network has no attention to show
        item = self.knn.val[0]
        if item is None:
            return  # unreadable: already warned about by the k-NN monitor
        d = self.cfg.data
        title = f"teacher attention, {when}: {self.knn.val.samples.path(0).name}"
        with _pictures_never_stop_training("the teacher's attention"):
            picture = attention_picture(backbone, item[0], d.mean, d.std, title)
            self.logger.images("attention/teacher", picture, caption=title)

    def _evaluate_knn(self) -> dict[str, float]:
        """The teacher's k-NN accuracy (``knn_top1``/``knn_top5``), and the student's
        (``knn_student_top1``/…) with ``monitor.knn_student``."""
        assert self.knn is not None
        # The backbones uncompiled: their eval mode and batch sizes would each be a new graph.
        args = (self.env.device, self.precision.autocast_dtype)
        scores = self.knn.evaluate(unwrap_compiled(self.teacher.backbone), *args)
        if self.cfg.monitor.knn_student:
            student = self.knn.evaluate(unwrap_compiled(self.student.backbone), *args)
            scores.update({f"knn_student_{k.removeprefix('knn_')}": v for k, v in student.items()})
        return scores


def _seed_and_pick_kernels(cfg: DINOConfig, env: DistEnv) -> None:
    torch.manual_seed(cfg.run.seed + env.rank)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=env.device.type != "cpu")
    elif env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: cuDNN picks its fastest convolutions once


def _draw_curves(run_dir: Path) -> None:
    """``curves.png`` from the log so far; a picture that fails to draw never stops the run."""
    try:
        write_run_curves(run_dir)
    except Exception as err:  # matplotlib missing or broken, a full disk: the training goes on
        log.warning("could not draw %s: %s", run_dir / "curves.png", err)


@contextlib.contextmanager
def _pictures_never_stop_training(what: str) -> Iterator[None]:
    """A picture for TensorBoard or W&B that cannot be drawn is skipped with a warning."""
    try:
        yield
    except Exception as err:  # matplotlib missing, out of memory, an odd image: the training goes on
        log.warning("could not draw %s for the log (%s: %s); skipped", what, type(err).__name__, err)


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


def _warn_bad_step(iteration: int, loss: float, consecutive: int) -> None:
    log.warning(
        "non-finite loss (%s) at iteration %d: step skipped (%d in a row)", loss, iteration, consecutive
    )


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
