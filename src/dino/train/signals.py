"""Stop requests: SIGTERM / SIGUSR1 (what SLURM and most schedulers send), SIGUSR2 (submitit's warning
before a job's time limit or preemption) and a first Ctrl-C (SIGINT)
request a save-and-stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, f"SIG{name}", None) for name in ("TERM", "USR1", "USR2")) if s
)
STOP_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)  # every signal the guard takes over
EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's code for a command stopped by Ctrl-C


class Interrupted(SystemExit):
    """A second Ctrl-C: the run stops where it is, without saving (the checkpoints on disk are intact)."""

    def __init__(self) -> None:
        super().__init__(EXIT_INTERRUPTED)


_FIRST_CTRL_C = (
    "dino: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop at once)"
)
_SECOND_CTRL_C = "dino: second Ctrl-C: stopped at once, without saving; the checkpoints on disk are intact"


class PreemptionGuard:
    """While active, the signals set ``requested`` instead of killing the process; the loop then saves a
    checkpoint at the next iteration boundary and exits. A second Ctrl-C raises :class:`Interrupted` at
    once (a step can take long, or hang). Previous handlers are restored on exit. ``announce``: say on
    the console what a Ctrl-C does (on the main process only, or every process would)."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.signal_name: str | None = None  # the first signal received
        self.interrupted = False  # Ctrl-C was pressed
        self.announce = announce
        # None: a handler not installed from Python (put back as the default action)
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.interrupted:
            self._say(_SECOND_CTRL_C)
            raise Interrupted()
        if signum == signal.SIGINT:
            self.interrupted = True
            self._say(_FIRST_CTRL_C)
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name

    def _say(self, line: str) -> None:
        # os.write, not print or logging: a handler runs between two bytecodes of the main thread, which
        # may be inside a write to sys.stderr, and its buffered writer refuses to be re-entered.
        if self.announce:
            try:
                os.write(2, f"\n{line}\n".encode())
            except OSError:
                pass

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
