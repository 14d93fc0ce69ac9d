"""When a run saves a checkpoint and when it stops: the policy ``dino train`` and ``dino finetune`` share.

After every step: save and stop on a stop request (SIGTERM/SIGUSR1, Ctrl-C: :class:`Preempted`); save when
``run.checkpoint_every_iters`` or ``run.checkpoint_every_minutes`` says so. At an epoch end: the rolling
checkpoint every ``run.checkpoint_every_epochs`` and after the last epoch, a kept one every
``run.save_every_epochs``. What a checkpoint holds is the run's own (the ``save`` it is given).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from dino.checkpoint import CheckpointManager
from dino.config import RunConfig
from dino.train.distributed import DistEnv, any_processes
from dino.train.logger import RunLogger
from dino.train.signals import EXIT_INTERRUPTED, PreemptionGuard

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped on request; launch again to resume
PREEMPTION_POLL_STEPS = 10  # with several processes, how often they agree on a stop request


class Preempted(SystemExit):
    """Saved and stopped on request: EXIT_PREEMPTED for a scheduler's signal, EXIT_INTERRUPTED for Ctrl-C."""

    def __init__(self, code: int = EXIT_PREEMPTED) -> None:
        super().__init__(code)


class CheckpointPolicy:
    """Decides when ``save`` runs. ``save(epoch_keeper)`` writes the run's checkpoint (also kept as
    ``epoch-<epoch_keeper>.pth`` when given) and returns its path on the main process, None elsewhere or
    when nothing was saved; every process calls it (it may hold a collective)."""

    def __init__(
        self,
        run: RunConfig,
        env: DistEnv,
        checkpoints: CheckpointManager,
        save: Callable[[int | None], Path | None],
    ) -> None:
        self.run, self.env, self.checkpoints, self.save = run, env, checkpoints, save
        self.last_save_time = time.monotonic()

    def restart_clock(self) -> None:
        """``run.checkpoint_every_minutes`` counts from now (the start of training)."""
        self.last_save_time = time.monotonic()

    def after_step(self, it: int, iteration: int, preemption: PreemptionGuard, logger: RunLogger) -> None:
        """After step ``it`` (``iteration`` steps done): save and stop on a stop request; save when
        ``run.checkpoint_every_iters`` or ``run.checkpoint_every_minutes`` says so."""
        stop, minutes_due = self._agreed_requests(it, preemption)
        if stop:
            self._save_and_stop(preemption, iteration, logger)
        every_iters = self.run.checkpoint_every_iters
        if minutes_due or (every_iters and iteration % every_iters == 0):
            self.save(None)
            self.last_save_time = time.monotonic()

    def at_epoch_end(self, epochs_done: int, final: bool = False) -> None:
        """A periodic keeper every ``run.save_every_epochs``; the rolling checkpoint every
        ``run.checkpoint_every_epochs``, after the last epoch, and after an epoch that ends the run early
        (``final``: a time limit)."""
        r = self.run
        keeper = epochs_done if r.save_every_epochs and epochs_done % r.save_every_epochs == 0 else None
        last = final or epochs_done == r.epochs
        if keeper is not None or epochs_done % r.checkpoint_every_epochs == 0 or last:
            self.save(keeper)
            self.last_save_time = time.monotonic()

    def _agreed_requests(self, it: int, preemption: PreemptionGuard) -> tuple[bool, bool]:
        """Whether to stop, and whether a checkpoint is due by the clock, the same on every process.

        Both are each process's own; all must take the same branch (saving is a collective), and agreeing
        takes a collective and a host sync: every few steps only."""
        stop, minutes_due = preemption.requested, self._minutes_due()
        if self.env.distributed:
            agree = (it + 1) % PREEMPTION_POLL_STEPS == 0
            stop, minutes_due = (
                any_processes([stop, minutes_due], self.env.device) if agree else (False, False)
            )
        return stop, minutes_due

    def _minutes_due(self) -> bool:
        every_minutes = self.run.checkpoint_every_minutes
        return bool(every_minutes) and time.monotonic() - self.last_save_time >= every_minutes * 60

    def _save_and_stop(self, preemption: PreemptionGuard, iteration: int, logger: RunLogger) -> NoReturn:
        saved = self.save(None)
        newest = None if saved else next(iter(self.checkpoints.rolling()), None)
        logger.stopped(preemption.signal_name, iteration, saved, newest)
        logger.close()
        raise Preempted(EXIT_INTERRUPTED if preemption.interrupted else EXIT_PREEMPTED)
