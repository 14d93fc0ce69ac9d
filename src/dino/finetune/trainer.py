"""Fine-tuning: the whole network (pretrained backbone + new linear head) trained on labelled images with
DeiT's recipe (Touvron et al. 2021), the paper's transfer protocol.

    for images, labels in loader:           # RandAugment, random erasing (timm), per sample
        images, targets = mix(images, labels) # Mixup / CutMix, smoothed soft targets (timm)
        loss = soft_target_cross_entropy(model(images), targets)   # stochastic depth in the backbone
        loss.backward(); AdamW step         # lr: warm-up + cosine, × layer_decay^(depth + 1 − layer)

:class:`FinetuneStep` is that body, runnable on its own; :class:`FinetuneTrainer` the run around it, built
from the pieces ``dino train`` uses: the run directory's checkpoints (:class:`~dino.checkpoint.CheckpointManager`,
atomic), exact resume (:func:`~dino.train.resume.resume_point`, the random streams of every process),
stop requests and when to save (:class:`~dino.train.policy.CheckpointPolicy`), skipped non-finite steps
(:class:`~dino.train.guard.NonFiniteGuard`), the JSONL log and progress bar (:class:`~dino.train.logger.RunLogger`),
precision (:mod:`dino.devices`) and DDP under torchrun (:mod:`dino.train.distributed`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from dino.checkpoint import CheckpointManager, atomic_save, load_checkpoint
from dino.config import ConfigError, config_to_dict, save_config
from dino.devices import Precision, resolve_precision
from dino.finetune.config import FinetuneConfig
from dino.finetune.curves import write_finetune_curves
from dino.finetune.data import FinetuneData, SeededMixup, build_finetune_data
from dino.finetune.evaluate import ClassifierAccuracy, evaluate_classifier
from dino.finetune.model import BackboneSpec, Classifier, build_classifier, param_groups
from dino.hub import read_backbone_weights, resolve_weights
from dino.train.distributed import DistEnv, barrier, cleanup, init_distributed
from dino.train.guard import NonFiniteGuard
from dino.train.logger import RunLogger, counted, peak_memory_gib
from dino.train.optim import fused_supported
from dino.train.policy import CheckpointPolicy
from dino.train.resume import TrainState, resume_point, set_aside_replaced_files
from dino.train.schedules import cosine_schedule
from dino.train.setup import gather_process_rng, restore_process_rng
from dino.train.signals import PreemptionGuard
from dino.train.sinks import check_sinks_available

log = logging.getLogger("dino.train")

CHECKPOINT_KIND = "finetune"
RUN_OUTPUTS = (
    "checkpoints", "log.jsonl", "config.yaml", "curves.png", "classifier.pth", "eval.json",
    "tensorboard", "wandb", "wandb_run_id",
)  # fmt: skip


def lr_schedule(cfg: FinetuneConfig, iters_per_epoch: int, world_size: int) -> np.ndarray:
    """Per-iteration learning rate: ``optim.lr`` × total batch / 512 (DeiT's scaling), a linear warm-up
    from ``optim.warmup_lr``, then a cosine to ``optim.min_lr`` (the formula ``dino train`` uses)."""
    o, r = cfg.optim, cfg.run
    peak = o.lr * r.batch_size * world_size / 512.0
    return cosine_schedule(peak, o.min_lr, r.epochs, iters_per_epoch, o.warmup_epochs, o.warmup_lr)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy``: mean over the batch of −Σ targets · log-softmax(logits)."""
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits.float(), targets)


class FinetuneStep:
    """One step: mix the batch, forward, soft-target cross-entropy, backward, (clip), AdamW with this
    iteration's learning rate per parameter group. A non-finite loss changes nothing."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        model: Classifier,
        optimizer: torch.optim.Optimizer,
        lr: np.ndarray,
        num_classes: int,
        precision: Precision,
        device: torch.device,
        rank: int = 0,
        distributed: bool = False,
        on_bad_step: Callable[[int, float, int], None] | None = None,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.lr = cfg, model, optimizer, lr
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        self.mix = SeededMixup(cfg, num_classes, rank)
        self.ddp_model: torch.nn.Module = (
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            if distributed
            else model
        )
        self.guard = NonFiniteGuard(
            optimizer,
            device,
            cfg.run.max_bad_steps,
            on_bad_step=on_bad_step or (lambda it, loss, n: log.warning("non-finite loss at %d", it)),
            divergence_message=lambda n: (
                f"stopping after {counted(n, 'consecutive non-finite loss', 'consecutive non-finite losses')}; "
                f"the last good checkpoint is kept. Lower optim.lr (now {cfg.optim.lr}), set optim.clip_grad, "
                "or use run.precision=bf16/fp32 instead of fp16"
            ),
            grad_scaler_enabled=precision.use_scaler,
        )

    def step(self, images: torch.Tensor, labels: torch.Tensor, iteration: int) -> torch.Tensor:
        """Train on one batch at ``iteration``; returns the loss, left on the device."""
        lr = float(self.lr[iteration])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        # Mixup / CutMix with label smoothing: soft targets that sum to one.
        images, targets = self.mix(images, labels, iteration)
        p = self.precision
        with torch.autocast(self.device.type, dtype=p.autocast_dtype, enabled=p.autocast):
            logits = self.ddp_model(images)
        loss = soft_target_cross_entropy(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if not self.guard.admit(iteration, loss):
            return loss
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def build_optimizer(cfg: FinetuneConfig, model: Classifier) -> torch.optim.AdamW:
    """AdamW over the layer-wise parameter groups (fused where the device has the kernel)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.layer_decay)
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), fused=fused_supported(model) or None
    )


class FinetuneTrainer:
    """A fine-tuning run on one process of ``env``: set up by the constructor (weights, checkpoint, data,
    model, optimiser), run by :meth:`fit`. What can fail cheaply fails first: the weights file and the
    checkpoint before the folders are scanned."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, resume: str | Path | bool = True) -> None:
        self.cfg, self.env = cfg, env
        _check_timm()
        if env.is_main:
            check_sinks_available(cfg.log)  # TensorBoard, W&B installed, before the data are read
        self.run_dir = Path(cfg.run.output_dir).expanduser()
        self.global_batch = cfg.run.batch_size * env.world_size
        torch.manual_seed(cfg.run.seed + env.rank)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=env.device.type != "cpu")
        self.precision = resolve_precision(cfg.run.precision, env.device)
        m = cfg.model
        assert m.weights is not None  # validated
        _check_output_apart(self.run_dir, resolve_weights(m.weights, m.weights_dir))
        weights = read_backbone_weights(m.weights, m.which, weights_dir=m.weights_dir)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.run.keep_last)
        restored = self._find_checkpoint(resume)
        self.data: FinetuneData = build_finetune_data(cfg, env.rank, env.world_size)
        start: Any = BackboneSpec(weights.arch, weights.patch_size, weights.img_size, weights.depth)
        if not m.random_init and restored is None:
            start = weights
        self.model, self.spec = build_classifier(
            start, self.data.num_classes, cfg.data.img_size, m.drop_path_rate, m.head_init_std, m.init_seed
        )
        self.model.to(env.device)
        self.source = "random init" if m.random_init else weights.source
        self.optimizer = build_optimizer(cfg, self.model)
        self.lr = lr_schedule(cfg, self.data.iters_per_epoch, env.world_size)
        self.state = TrainState()
        self.resumed_from: dict[str, Any] | None = None
        self.training_step = FinetuneStep(
            cfg, self.model, self.optimizer, self.lr, self.data.num_classes, self.precision, env.device,
            env.rank, env.distributed, on_bad_step=self._bad_step,
        )  # fmt: skip
        if restored is not None:
            self._resume(*restored)
        barrier()
        if env.is_main:
            self._prepare_run_directory(restored)
        self.logger = RunLogger.for_run(self.run_dir, cfg, env.is_main, cfg.run.progress_bar)
        self.policy = CheckpointPolicy(cfg.run, env, self.checkpoints, self._save)

    # Setup.

    def _find_checkpoint(self, resume: str | Path | bool) -> tuple[dict, Path] | None:
        if resume is False:
            return None
        found = (
            self.checkpoints.load_latest(map_location=self.env.device)
            if resume is True
            else (load_checkpoint(Path(resume), map_location=self.env.device), Path(resume))
        )
        if found is not None and found[0].get("kind") != CHECKPOINT_KIND:
            raise ConfigError(
                f"{found[1]} is not a fine-tuning checkpoint; give --output a directory of its own for the "
                "fine-tuning run (a DINO run is named with --weights)"
            )
        return found

    def _resume(self, checkpoint: dict, path: Path) -> None:
        classes = list(checkpoint["classes"])
        if classes != self.data.train.classes:
            raise ConfigError(
                f"{path} was trained on {len(classes)} classes ({', '.join(classes[:5])}, …), not those of "
                f"data.train; resume with the same folder, or start afresh (--no-resume)"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("fp16_scaler") is not None and self.precision.use_scaler:
            self.training_step.scaler.load_state_dict(checkpoint["fp16_scaler"])
        if not restore_process_rng(checkpoint["rng"], self.env.rank, self.env.world_size):
            log.warning(
                "the checkpoint's random state is for another number of processes: streams start afresh"
            )
        self.source = str(checkpoint.get("source", self.source))
        self.state = resume_point(checkpoint, self.data.iters_per_epoch, self.global_batch)
        log.info("resumed from %s at epoch %d, iteration %d", path, self.state.epoch, self.state.iteration)
        self.resumed_from = {
            "checkpoint": str(path),
            "epoch": self.state.epoch,
            "iteration": self.state.iteration,
        }

    def _prepare_run_directory(self, restored: tuple[dict, Path] | None) -> None:
        """Files of a run this one replaces moved aside (nothing deleted); the config saved."""
        moved = set_aside_replaced_files(
            self.run_dir, self.checkpoints, restored, self.state.iteration, RUN_OUTPUTS
        )
        if moved is not None:
            log.warning("files of the run this one replaces moved to %s", moved)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        self.checkpoints.remove_stale_temporaries()

    def _bad_step(self, iteration: int, loss: float, consecutive: int) -> None:
        self.logger.bad_step(iteration, loss, consecutive)

    # The run.

    def fit(self) -> ClassifierAccuracy:
        """Train to ``run.epochs``, evaluating on ``data.val`` after every epoch; write ``classifier.pth``
        and ``eval.json``; return the final accuracy. Raises :class:`~dino.train.policy.Preempted` after saving on a stop
        request."""
        cfg, env = self.cfg, self.env
        self.logger.begin(
            env,
            images=len(self.data.train),
            iters_per_epoch=self.data.iters_per_epoch,
            arch=self.spec.arch,
            patch_size=self.spec.patch_size,
            num_classes=self.data.num_classes,
            source=self.source,
            global_batch_size=self.global_batch,
            resumed_from=self.resumed_from,
        )
        self.policy.restart_clock()
        with PreemptionGuard(announce=env.is_main) as preemption:
            while self.state.epoch < cfg.run.epochs:
                self.train_one_epoch(preemption)
                self.end_epoch()
        result = self.evaluate()
        if env.is_main:
            atomic_save(self.classifier_state(), self.run_dir / "classifier.pth")
            report = {**self.describe(), **result.as_dict()}
            (self.run_dir / "eval.json").write_text(json.dumps(report, indent=2))
            self.logger.event("done", epochs=self.state.epoch, iterations=self.state.iteration,
                              val_top1=result.top1, val_top5=result.top5,
                              peak_memory_gib=peak_memory_gib(env.device))  # fmt: skip
        self.logger.close()
        return result

    def train_one_epoch(self, preemption: PreemptionGuard) -> None:
        state, epoch = self.state, self.state.epoch
        self.data.set_epoch(epoch, state.step_in_epoch, self.cfg.run.batch_size)
        self.logger.start_epoch(epoch, self.data.iters_per_epoch, state.step_in_epoch, self.global_batch)
        self.model.train()
        for images, labels, n_bad in self.data.loader:
            self.logger.count_bad_files(n_bad)
            it = state.iteration
            if labels.numel() < 2:  # every image (but one) failed to decode: nothing to pair or learn from
                loss = None
            else:
                loss = self.training_step.step(images, labels, it)
            state.iteration += 1
            state.step_in_epoch += 1
            if loss is not None:
                log_now = (it + 1) % self.cfg.run.log_every == 0
                self.logger.step(it, epoch, self.global_batch, loss=loss, stats={}, lr=float(self.lr[it]),
                                 log_now=log_now)  # fmt: skip
                if log_now:
                    self.training_step.guard.poll()
            self.policy.after_step(it, state.iteration, preemption, self.logger)

    def end_epoch(self) -> None:
        """The epoch's summary, the held-out accuracy, ``curves.png``, then the epoch's checkpoint."""
        epoch = self.state.epoch
        self.training_step.guard.poll()
        self.logger.end_epoch(epoch)
        result = self.evaluate()
        self.logger.event(
            "eval", epoch=epoch, val_top1=result.top1, val_top5=result.top5, val_loss=result.loss
        )
        if self.env.is_main:
            log.info("epoch %d: held-out top-1 %.2f %%, top-5 %.2f %%", epoch, result.top1, result.top5)
            try:
                write_finetune_curves(self.run_dir)
            except Exception as err:  # a picture that fails to draw never stops the run
                log.warning("could not draw %s: %s", self.run_dir / "curves.png", err)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.policy.at_epoch_end(self.state.epoch)

    def evaluate(self) -> ClassifierAccuracy:
        """Top-1/top-5 and per-class top-1 on ``data.val`` (every process evaluates the whole folder)."""
        return evaluate_classifier(
            self.model,
            self.data.val_loader,
            self.data.val.classes,
            self.env.device,
            self.precision.autocast_dtype,
        )

    # Checkpoints (when: :class:`~dino.train.policy.CheckpointPolicy`, as in ``dino train``).

    def _save(self, epoch_keeper: int | None = None) -> Path | None:
        if self.training_step.guard.poll() != 0:  # never while non-finite losses are being skipped
            return None
        rng = gather_process_rng(self.env.world_size)
        if not self.env.is_main:
            return None
        s = self.state
        scaler = self.training_step.scaler
        checkpoint = {
            "kind": CHECKPOINT_KIND,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "fp16_scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": s.epoch,
            "iteration": s.iteration,
            "step_in_epoch": s.step_in_epoch,
            "global_batch_size": self.global_batch,
            "rng": rng,
            "config": config_to_dict(self.cfg),
            **self.describe(),
        }
        return self.checkpoints.save(checkpoint, s.iteration, epoch_keeper)

    def describe(self) -> dict[str, Any]:
        """What rebuilds the classifier: the backbone's architecture, the classes, where it started."""
        sp = self.spec
        return {
            "backbone": {
                "arch": sp.arch,
                "patch_size": sp.patch_size,
                "img_size": sp.img_size,
                "depth": sp.depth,
            },
            "classes": list(self.data.train.classes),
            "source": self.source,
        }

    def classifier_state(self) -> dict[str, Any]:
        """``classifier.pth``: the fine-tuned weights (``backbone.*``, ``head.*``) and what rebuilds them."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        return {"kind": "classifier", "model": state, **self.describe()}


def _check_timm() -> None:
    """The recipe's augmentation, mixing and loss are timm's: say how to install it before any work."""
    try:
        import timm  # noqa: F401
    except ImportError as err:
        raise ConfigError("dino finetune needs timm: pip install 'dino[finetune]'") from err


def _check_output_apart(run_dir: Path, weights: Path) -> None:
    """The fine-tuning run needs a directory of its own: starting it in the run it fine-tunes (or a folder
    holding its weights) would move that run's files aside."""
    run_dir, weights = run_dir.resolve(), weights.resolve()
    if weights == run_dir or run_dir in weights.parents:
        raise ConfigError(
            f"run.output_dir {run_dir} holds the weights to fine-tune ({weights}); give --output a directory "
            "of its own"
        )


def finetune(cfg: FinetuneConfig, resume: str | Path | bool = True) -> ClassifierAccuracy:
    """Fine-tune as ``cfg`` says (one process, or every process of a torchrun launch); returns the final
    held-out accuracy (also in ``run.output_dir/eval.json``). ``resume``: True (continue the run in
    ``run.output_dir`` if it has a checkpoint), False, or a checkpoint to continue from."""
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_minutes)
    try:
        return FinetuneTrainer(cfg, env, resume).fit()
    finally:
        cleanup()
