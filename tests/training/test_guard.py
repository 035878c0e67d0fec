"""training/guard.py: Ctrl-C is a pre-emption that exits 130 (a second one stops at once), SIGHUP one
that exits 129; the ranks agree on the strongest signal any of them received."""

from __future__ import annotations

import signal

import pytest

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.training import guard


def test_first_sigint_sets_the_flag_a_duplicate_is_ignored_a_second_raises(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: clock[0])
    signals = guard.StopSignals(True, None, 0.0)
    signals._handler(signal.SIGINT, None)
    assert signals.local_flags() == (True, False) and signals._level() == 3.0
    clock[0] += 0.01  # torchrun's forwarded copy of the same Ctrl-C
    signals._handler(signal.SIGINT, None)
    clock[0] += guard.DUPLICATE_SIGINT_S + 0.5
    with pytest.raises(KeyboardInterrupt):
        signals._handler(signal.SIGINT, None)


def test_exit_code_follows_what_the_ranks_agreed():
    signals = guard.StopSignals(True, None, 0.0)
    signals._handler(signal.SIGTERM, None)
    assert signals._level() == 1.0 and signals.exit_code() == ExitCode.PREEMPTED
    signals._handler(signal.SIGHUP, None)  # a closed terminal wins over SIGTERM
    assert signals._level() == 2.0
    signals.agreed_level = 2
    assert signals.exit_code() == ExitCode.HANGUP == 129 and not signals.agreed_interrupt
    signals._handler(signal.SIGINT, None)  # Ctrl-C wins over both
    signals._handler(signal.SIGTERM, None)  # and a later SIGTERM does not undo it
    assert signals._level() == 3.0
    signals.agreed_level = 3
    assert signals.exit_code() == ExitCode.INTERRUPTED == 130 and signals.agreed_interrupt


def test_signals_recorded_before_install_are_handed_over_by_level():
    signals = guard.StopSignals(True, None, 0.0)
    signals.record([signal.SIGHUP, signal.SIGTERM])
    assert signals.received == signal.SIGHUP and signals.interrupted_at is None
    signals.record([signal.SIGINT])
    assert signals.received == signal.SIGINT and signals.interrupted_at is not None


def test_sighup_stays_ignored_under_nohup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signals = guard.StopSignals(True, None, 0.0)
    try:
        signals.install()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signals._handler
    finally:
        signals.uninstall()
        signal.signal(signal.SIGHUP, previous)


def test_stop_requested_reduces_the_signal_kind(megatron_world):
    signals = guard.StopSignals(True, None, 0.0)
    assert guard.stop_requested(signals) == (False, False) and not signals.agreed_interrupt
    signals._handler(signal.SIGINT, None)
    assert guard.stop_requested(signals) == (True, False) and signals.agreed_interrupt
