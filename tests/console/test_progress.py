"""Progress bars of long one-off work: shown on a terminal, silent in logs and pipes."""

from __future__ import annotations

import io

from tinker_backend.model_registry import phase_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_phase_bar_shows_on_a_terminal_and_completes():
    out = Terminal()
    with phase_bar("converting", ["read", "copy", "save"], file=out) as next_phase:
        next_phase()
        assert "1/3" in out.getvalue() and "copy" in out.getvalue()
        next_phase()
    assert "3/3" in out.getvalue() and "converting" in out.getvalue()


def test_a_phase_bar_is_silent_where_nobody_watches():
    out = io.StringIO()  # not a TTY: a log file, a pipe, CI
    with phase_bar("converting", ["read", "save"], file=out) as next_phase:
        next_phase()
    assert out.getvalue() == ""
