"""Run logging: JSON lines (per N iterations, per epoch, events), a progress bar on terminals, plain
log lines elsewhere. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dino.train.config import DINOConfig
    from dino.train.distributed import DistEnv

log = logging.getLogger("dino.train")


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Mean:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self.total += value
            self.count += 1

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")


class RunLogger:
    def __init__(self, path: Path, enabled: bool = True, progress: str = "auto") -> None:
        self.enabled = enabled
        self.path = path
        self._file = open(path, "a", buffering=1) if enabled else None  # noqa: SIM115
        self.use_bar = enabled and (progress == "always" or (progress == "auto" and sys.stderr.isatty()))
        self._bar = None
        self._device = torch.device("cpu")
        self._window: dict[str, list[torch.Tensor]] = {}
        self._epoch: dict[str, _Mean] = {}
        self._window_images = 0
        self._window_start = time.perf_counter()
        self._epoch_start = time.perf_counter()
        self._epoch_images = 0
        self.bad_files = 0
        self.bad_steps = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, default=float) + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        self.write({"type": kind, "time": time.time(), **fields})
        if self.enabled and kind == "knn":
            log.info(
                "k-NN on held-out images after epoch %s: top-1 %.2f%%, top-5 %.2f%%",
                fields.get("epoch"),
                fields.get("knn_top1", float("nan")),
                fields.get("knn_top5", float("nan")),
            )

    def start(self, cfg: DINOConfig, env: DistEnv, n_images: int, iters_per_epoch: int) -> None:
        self._device = env.device
        self.event(
            "start",
            device=str(env.device),
            world_size=env.world_size,
            images=n_images,
            iters_per_epoch=iters_per_epoch,
            arch=cfg.model.arch,
            patch_size=cfg.model.patch_size,
            out_dim=cfg.head.out_dim,
            global_batch_size=cfg.run.batch_size * env.world_size,
        )
        if self.enabled:
            log.info(
                "training %s/%d on %s × %d: %d images, %d iterations per epoch, %d epochs",
                cfg.model.arch,
                cfg.model.patch_size,
                env.device,
                env.world_size,
                n_images,
                iters_per_epoch,
                cfg.run.epochs,
            )

    def start_epoch(self, epoch: int, iters: int, done: int) -> None:
        self._epoch = {}
        self._epoch_images = 0
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_images = 0
        self.bad_files = 0
        self.bad_steps = 0
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=iters, initial=done, desc=f"epoch {epoch}", unit="it", dynamic_ncols=True, leave=False
            )

    def count_bad_files(self, n: int) -> None:
        self.bad_files += n

    def bad_step(self, iteration: int, loss: float, consecutive: int) -> None:
        self.bad_steps += 1
        self.event("nonfinite_loss", iteration=iteration, loss=loss, consecutive=consecutive)
        log.warning(
            "non-finite loss (%s) at iteration %d: step skipped (%d in a row)", loss, iteration, consecutive
        )

    def step(
        self,
        iteration: int,
        epoch: int,
        images: int,
        loss: torch.Tensor,
        stats: dict[str, torch.Tensor],
        log_now: bool,
        **scalars: float,
    ) -> dict[str, Any] | None:
        """Accumulate one step; every ``log_every`` steps read the values (one host sync) and log them."""
        self._window_images += images
        self._epoch_images += images
        pending = {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}
        for key, value in pending.items():
            self._window.setdefault(key, []).append(value)
        if self._bar is not None:
            self._bar.update(1)
        if not log_now:
            return None
        record: dict[str, Any] = {"type": "iter", "epoch": epoch, "iteration": iteration}
        for key, values in self._window.items():
            numbers = torch.stack(values).float().cpu().tolist()
            finite = [v for v in numbers if math.isfinite(v)]
            record[key] = sum(finite) / len(finite) if finite else float("nan")
            mean = self._epoch.setdefault(key, _Mean())
            for v in numbers:
                mean.add(v)
        record.update(scalars)
        elapsed = time.perf_counter() - self._window_start
        record["images_per_s"] = self._window_images / elapsed if elapsed > 0 else float("nan")
        record["peak_memory_gib"] = peak_memory_gib(self._device)
        record["time"] = time.time()
        self._window = {}
        self._window_images = 0
        self._window_start = time.perf_counter()
        self.write(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
        elif self.enabled:
            log.info(
                "epoch %d it %d  loss %.4f  entropy %.3f  kl %.4f  lr %.2e  %.1f img/s",
                epoch,
                iteration,
                record["loss"],
                record["teacher_entropy"],
                record["kl"],
                record["lr"],
                record["images_per_s"],
            )
        return record

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        for key, values in self._window.items():  # steps since the last log point
            for v in torch.stack(values).float().cpu().tolist():
                self._epoch.setdefault(key, _Mean()).add(v)
        self._window = {}
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elapsed = time.perf_counter() - self._epoch_start
        summary: dict[str, Any] = {
            "type": "epoch",
            "epoch": epoch,
            **{k: m.value for k, m in self._epoch.items()},
        }
        summary.update(
            images_per_s=self._epoch_images / elapsed if elapsed > 0 else float("nan"),
            seconds=elapsed,
            bad_files=self.bad_files,
            skipped_steps=self.bad_steps,
            peak_memory_gib=peak_memory_gib(self._device),
            time=time.time(),
        )
        self.write(summary)
        if self.enabled:
            log.info(
                "epoch %d done: loss %.4f  entropy %.3f  kl %.4f  %.1f img/s  %d unreadable files skipped",
                epoch,
                summary.get("loss", float("nan")),
                summary.get("teacher_entropy", float("nan")),
                summary.get("kl", float("nan")),
                summary["images_per_s"],
                self.bad_files,
            )
        return summary

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
