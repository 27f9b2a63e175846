"""Machine sampling: what this harness started is its own, everything else is other load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadtests.sampling import ProcessTable, cpu_seconds, descendants, foreign_cpu, peak_rss, process_table


def test_descendants_follow_the_tree_down_only() -> None:
    table: ProcessTable = {10: (1, 0.0), 11: (10, 0.0), 12: (11, 0.0), 13: (1, 0.0), 14: (13, 0.0)}
    assert descendants(table, 10) == {10, 11, 12}
    assert descendants(table, 99) == {99}


def test_foreign_cpu_counts_other_processes_not_ours() -> None:
    me = os.getpid()
    before: ProcessTable = {me: (1, 5.0), 500: (me, 1.0), 501: (500, 1.0), 900: (1, 2.0)}
    # Our child and grandchild (a server and its worker) burned CPU, and so did a stranger;
    # a stranger that appeared meanwhile counts whole, and one that left counts nothing.
    after: ProcessTable = {me: (1, 6.0), 500: (me, 3.0), 501: (500, 4.0), 900: (1, 2.5), 901: (1, 0.25)}
    assert foreign_cpu(before, after) == pytest.approx(0.75)


def test_live_processes_are_read_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        table = process_table()
        assert table[child.pid][0] == os.getpid()
        assert child.pid in descendants(table, os.getpid())
        assert cpu_seconds(child.pid) >= 0.0
        peak = peak_rss(child.pid)
        assert peak is not None and peak > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert peak_rss(child.pid) is None
    assert cpu_seconds(child.pid) == 0.0
