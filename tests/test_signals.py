"""Stop requests: a scheduler's signal or a first Ctrl-C asks for a save-and-stop; a second Ctrl-C stops."""

from __future__ import annotations

import signal

import pytest

from dino.train.signals import EXIT_INTERRUPTED, Interrupted, PreemptionGuard


def send(sig: signal.Signals) -> None:
    """Deliver ``sig`` to this process; a Ctrl-C the guard let through fails the test, not the session."""
    try:
        signal.raise_signal(sig)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt instead of requesting a save-and-stop")


def test_a_first_ctrl_c_requests_a_stop_and_a_second_stops_at_once(capfd):
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        send(signal.SIGINT)
        assert guard.requested and guard.interrupted and guard.signal_name == "SIGINT"
        assert "saving a checkpoint after this step" in capfd.readouterr().err
        with pytest.raises(Interrupted) as caught:
            send(signal.SIGINT)
    assert caught.value.code == EXIT_INTERRUPTED == 130
    assert "stopped at once, without saving" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_requests_a_stop_silently_and_only_the_main_process_announces_ctrl_c(capfd):
    with PreemptionGuard(announce=False) as guard:
        send(signal.SIGTERM)
        assert guard.requested and not guard.interrupted and guard.signal_name == "SIGTERM"
        send(signal.SIGINT)  # the first Ctrl-C after it: still a save-and-stop
        assert guard.interrupted and guard.signal_name == "SIGTERM"
    assert capfd.readouterr().err == ""
