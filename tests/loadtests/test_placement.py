"""CPU placement: a server's every thread goes where the placement says, and a client is started
on its CPUs. Real processes, read back from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loadtests.placement import SPLIT, UNPINNED, pin, placement, threads_of, usable_cpus

needs_two = pytest.mark.skipif(len(usable_cpus()) < 2, reason="placement needs two CPUs to mean anything")

# A child with a second thread, which prints once both exist and then waits for stdin to close.
CHILD = """
import sys, threading
t = threading.Thread(target=sys.stdin.read, daemon=True)
t.start()
print("ready", flush=True)
t.join()
"""


@needs_two
def test_split_pins_every_thread_of_a_server_and_unpinned_frees_them() -> None:
    split = placement(SPLIT)
    assert split.server is not None and split.client is not None
    assert not split.server & split.client
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        tids = threads_of(child.pid)
        assert len(tids) >= 2
        split.place_servers([child.pid])
        assert {frozenset(os.sched_getaffinity(t)) for t in tids} == {split.server}
        placement(UNPINNED).place_servers([child.pid])
        assert {frozenset(os.sched_getaffinity(t)) for t in tids} == {usable_cpus()}
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


@needs_two
def test_a_client_starts_on_the_client_cpus() -> None:
    split = placement(SPLIT)
    argv = split.client_argv([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    assert out.strip() == str(sorted(split.client or ()))
    assert placement(UNPINNED).client_argv(["true"]) == ["true"]


def test_unknown_placements_are_refused_and_pinning_a_gone_thread_is_harmless() -> None:
    with pytest.raises(ValueError, match="unknown placement"):
        placement("everywhere")
    pin([2**22 + 1], None)  # no such process: nothing to place, no error
