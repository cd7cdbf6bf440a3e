from __future__ import annotations

import io
import sys

from churn.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_quiet_when_stderr_is_not_a_terminal(capsys):
    with progress("rows scored", 10) as advance:
        advance(4)
        advance(6)
    assert capsys.readouterr().err == ""


def test_bar_on_a_terminal_counts_steps(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress("trees trained", 40) as advance:
        for _ in range(25):
            advance(1)
    shown = terminal.getvalue()
    assert "trees trained" in shown
    assert "25/40" in shown
