"""LoggedProcess: output is kept in order, waiters wake on lines and on exit, stop is final."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.process import LoggedProcess


def test_lines_are_kept_and_waiters_wake_on_them(tmp_path: Path) -> None:
    script = "import sys\nfor i in range(3): print(f'line {i}', flush=True)\nsys.stdin.read()\n"
    proc = LoggedProcess([sys.executable, "-c", script], log_path=tmp_path / "log")
    with proc:
        assert proc.wait_for_line("line 2", timeout=30)
        assert proc.lines()[:3] == ["line 0", "line 1", "line 2"]
    assert proc.proc.poll() is not None
    assert (tmp_path / "log").read_text().splitlines()[:3] == ["line 0", "line 1", "line 2"]
    proc.stop()  # idempotent


def test_a_waiter_wakes_when_the_child_exits_without_the_line(tmp_path: Path) -> None:
    proc = LoggedProcess([sys.executable, "-c", "print('bye', end='')"], log_path=tmp_path / "log")
    with proc:
        assert not proc.wait_for_line("never printed", timeout=30)
        assert proc.lines() == ["bye"]
