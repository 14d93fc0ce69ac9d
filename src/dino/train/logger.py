"""Run logging: records (per N iterations, per epoch, events) to the run's sinks (``log.jsonl``, and
TensorBoard or W&B on request: :mod:`dino.train.sinks`), a progress bar on terminals, plain log lines
elsewhere. Only the main process writes."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dino.train.sinks import JsonLinesSink, Sink

if TYPE_CHECKING:
    from dino.config import DINOConfig
    from dino.train.distributed import DistEnv

log = logging.getLogger("dino.train")


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes: "1 epoch", "2 epochs", "1 process", "3 processes"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


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
    """The run's one write path: every record goes to ``path`` (JSON lines) and to each of ``sinks``.

    ``sinks`` (TensorBoard, W&B: :func:`dino.train.sinks.build_sinks`) get the records with the number of
    iterations done as their step; one that fails is turned off with a warning, the run goes on."""

    def __init__(
        self, path: Path, enabled: bool = True, progress: str = "auto", sinks: list[Sink] | None = None
    ) -> None:
        self.enabled = enabled
        self.path = path
        self._jsonl = JsonLinesSink(path) if enabled else None
        self._sinks: list[Sink] = list(sinks or []) if enabled else []
        self.steps_done = 0  # iterations done: the step sinks plot against
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

    @classmethod
    def for_run(cls, run_dir: Path, settings: Any, is_main: bool, progress: str) -> RunLogger:
        """``run_dir/log.jsonl`` on the main process, with the sinks ``settings.log`` asks for (TensorBoard,
        W&B); silent elsewhere. ``settings``: a run's config with a ``log`` section."""
        from dino.train.sinks import build_sinks

        sinks = build_sinks(settings, run_dir) if is_main else None
        return cls(run_dir / "log.jsonl", enabled=is_main, progress=progress, sinks=sinks)

    def write(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(record, self.steps_done)
        for sink in list(self._sinks):
            self._to_sink(sink, "write", record, self.steps_done)

    def images(self, tag: str, pictures: np.ndarray, caption: str) -> None:
        """Pictures ([N, H, W, 3] uint8) for the sinks that show them, at the current step."""
        for sink in list(self._sinks):
            self._to_sink(sink, "images", tag, pictures, self.steps_done, caption)

    @property
    def shows_images(self) -> bool:
        """Whether a sink would show pictures (computing them is then worth it)."""
        return bool(self._sinks)

    def _to_sink(self, sink: Sink, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as err:  # a full disk, a service gone: watching never stops training
            log.warning(
                "%s failed (%s: %s) and is turned off for this run",
                type(sink).__name__,
                type(err).__name__,
                err,
            )
            self._sinks.remove(sink)
            try:
                sink.close()
            except Exception:  # noqa: S110 - already reported; closing is best effort
                pass

    def event(self, kind: str, /, **fields: Any) -> None:
        """A record of type ``kind`` (positional-only: an event may have a field named ``kind``)."""
        self.write({"type": kind, "time": time.time(), **fields})
        if self.enabled and kind == "knn":
            log.info(
                "k-NN on held-out images after epoch %s: top-1 %.2f%%, top-5 %.2f%%",
                fields.get("epoch"),
                fields.get("knn_top1", float("nan")),
                fields.get("knn_top5", float("nan")),
            )

    def start(
        self,
        cfg: DINOConfig,
        env: DistEnv,
        n_images: int,
        iters_per_epoch: int,
        resumed_from: dict[str, Any] | None = None,
    ) -> None:
        """``resumed_from``: the checkpoint a continued run starts from (``checkpoint``, ``epoch``,
        ``iteration``), so that each ``start`` of a log written by several launches says where it is."""
        self.steps_done = int(resumed_from["iteration"]) if resumed_from else 0
        self.begin(
            env,
            images=n_images,
            iters_per_epoch=iters_per_epoch,
            arch=cfg.model.arch,
            patch_size=cfg.model.patch_size,
            out_dim=cfg.head.out_dim,
            global_batch_size=cfg.run.batch_size * env.world_size,
            resumed_from=resumed_from,
        )
        if self.enabled:
            log.info(
                "training %s/%d on %s × %d: %s, %s per epoch, %s",
                cfg.model.arch,
                cfg.model.patch_size,
                env.device,
                env.world_size,
                counted(n_images, "image"),
                counted(iters_per_epoch, "iteration"),
                counted(cfg.run.epochs, "epoch"),
            )

    def begin(self, env: DistEnv, /, **fields: Any) -> None:
        """The ``start`` record of any run on ``env`` (its device and processes, and ``fields``); peak
        memory is read on that device from here on."""
        self._device = env.device
        self.event("start", device=str(env.device), world_size=env.world_size, **fields)

    def start_epoch(self, epoch: int, iters: int, done: int, images_per_step: int) -> None:
        """An epoch of ``iters`` steps of ``images_per_step`` images (all processes), ``done`` of them
        already (a mid-epoch resume)."""
        self._epoch = {}
        self._epoch_images = 0
        self._epoch_start = self._window_start = time.perf_counter()
        self._window_images = 0
        self.bad_files = 0
        self.bad_steps = 0
        if self.use_bar:
            from tqdm import tqdm

            # Counted in images, so that its rate reads in images/s like the log's.
            self._bar = tqdm(
                total=iters * images_per_step,
                initial=done * images_per_step,
                desc=f"epoch {epoch}",
                unit="img",
                dynamic_ncols=True,
                leave=False,
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
        self.steps_done = iteration + 1
        pending = {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}
        for key, value in pending.items():
            self._window.setdefault(key, []).append(value)
        if self._bar is not None:
            self._bar.update(images)
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
        self._show_step(record)
        return record

    def _show_step(self, record: dict[str, Any]) -> None:
        """A log point on the console: the progress bar's loss, or one line."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}")  # the bar shows its own images/s
        elif self.enabled:
            log.info(
                "epoch %d it %d  %s  lr %.2e  %.1f img/s",
                record["epoch"],
                record["iteration"],
                _diagnostics(record),
                record["lr"],
                record["images_per_s"],
            )

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
                "epoch %d done: %s  %.1f img/s  %s skipped",
                epoch,
                _diagnostics({"loss": float("nan"), **summary}),
                summary["images_per_s"],
                counted(self.bad_files, "unreadable file"),
            )
        return summary

    def stopped(
        self, signal_name: str | None, iteration: int, saved: Path | None, newest: Path | None
    ) -> None:
        """A stop request was obeyed at ``iteration``: the ``preempted`` event, and one console line
        saying what was saved (``saved`` None: nothing, the newest checkpoint is ``newest``)."""
        self.event(
            "preempted", iteration=iteration, signal=signal_name, checkpoint=str(saved) if saved else None
        )
        if not self.enabled:
            return
        if self._bar is not None:  # the line below, not over the bar
            self._bar.close()
            self._bar = None
        cause = signal_name or "a stop request on another process"
        if saved is not None:
            done = f"saved {saved} at iteration {iteration} and stopped"
        else:  # non-finite losses are being skipped: the last good checkpoint stays the newest
            kept = f"newest checkpoint: {newest}" if newest is not None else "no checkpoint yet"
            done = f"stopped at iteration {iteration} without saving ({kept})"
        log.warning("%s: %s; run the same command again to continue", cause, done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as err:  # the JSON lines are safe; report and go on closing
                log.warning("could not close %s: %s", type(sink).__name__, err)
        self._sinks = []


# What a console line shows of a record: the loss, and DINO's collapse diagnostics where the run logs them.
_SHOWN = (("loss", "loss", ".4f"), ("teacher_entropy", "entropy", ".3f"), ("kl", "kl", ".4f"))


def _diagnostics(record: dict[str, Any]) -> str:
    return "  ".join(f"{label} {record[key]:{fmt}}" for key, label, fmt in _SHOWN if key in record)
