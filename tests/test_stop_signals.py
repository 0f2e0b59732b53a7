"""Exit codes after a stop signal: 128 + its number, even when a library re-raises it as a plain
KeyboardInterrupt while it cleans up."""

from __future__ import annotations

import signal

from evomerge.errors import Stopped, interrupted_exit_code


def test_ctrl_c_alone_exits_130(monkeypatch):
    monkeypatch.setattr(Stopped, "first_signal", None)
    assert interrupted_exit_code(KeyboardInterrupt()) == 130


def test_sigterm_exits_143_even_when_re_raised_as_a_plain_keyboard_interrupt(monkeypatch):
    monkeypatch.setattr(Stopped, "first_signal", None)
    first = Stopped(signal.SIGTERM)
    assert interrupted_exit_code(first) == 143
    assert interrupted_exit_code(KeyboardInterrupt()) == 143


def test_the_first_stop_signal_decides(monkeypatch):
    monkeypatch.setattr(Stopped, "first_signal", None)
    Stopped(signal.SIGHUP)
    Stopped(signal.SIGINT)
    assert interrupted_exit_code(KeyboardInterrupt()) == 128 + signal.SIGHUP
