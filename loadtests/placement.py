"""CPU placement: which cores the servers and the client may run on.

On a machine of two cores, where the client and the servers run decides much of what a
throughput figure means. ``unpinned`` leaves them to the scheduler: a server that spends less CPU
per byte leaves more to the client, and the client is often the bottleneck. ``split`` pins the
servers to one core and the client to the other: each side then has one core, whatever the
other spends. ``server-pinned`` pins the servers to one core and leaves the client free to use
both. Every figure the harness reports names its placement.

Servers are placed while they run (every thread of every process, so the workers nginx forked
and the threads Go or a thread pool started are placed too); new threads inherit the placement of
the thread that makes them. Clients are started under ``taskset``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

UNPINNED: Final = "unpinned"
SPLIT: Final = "split"
SERVER_PINNED: Final = "server-pinned"
# The harness's default placements; server-pinned is there for the placement question.
NAMES: Final = (UNPINNED, SPLIT)
ALL_NAMES: Final = (UNPINNED, SPLIT, SERVER_PINNED)


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may use (a container's cpuset may hide some of the machine's)."""
    return frozenset(os.sched_getaffinity(0))


def cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True)
class Placement:
    name: str
    server: frozenset[int] | None  # None: any usable CPU
    client: frozenset[int] | None

    def describe(self) -> str:
        if self.server is None and self.client is None:
            return f"unpinned (server and client on any of CPUs {cpu_list(usable_cpus())})"
        server = "any CPU" if self.server is None else f"CPU {cpu_list(self.server)}"
        client = "any CPU" if self.client is None else f"CPU {cpu_list(self.client)}"
        return f"server on {server}, client on {client}"

    def client_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started on the client's CPUs."""
        if self.client is None:
            return list(argv)
        return ["taskset", "--cpu-list", cpu_list(self.client), *argv]

    def place_servers(self, pids: Iterable[int]) -> None:
        pin(pids, self.server)


def placement(name: str) -> Placement:
    cpus = sorted(usable_cpus())
    if name == UNPINNED:
        return Placement(UNPINNED, None, None)
    if name == SPLIT:
        if len(cpus) < 2:
            raise ValueError("the split placement needs two CPUs")
        # The first CPU for the servers, the last for the client: on two cores, one each.
        return Placement(SPLIT, frozenset(cpus[:1]), frozenset(cpus[-1:]))
    if name == SERVER_PINNED:
        return Placement(SERVER_PINNED, frozenset(cpus[:1]), None)
    raise ValueError(f"unknown placement {name!r}; known: {', '.join(ALL_NAMES)}")


def threads_of(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pids: Iterable[int], cpus: frozenset[int] | None) -> None:
    """Every thread of ``pids`` onto ``cpus`` (None: every usable CPU)."""
    target = cpus if cpus is not None else usable_cpus()
    for pid in pids:
        for tid in threads_of(pid):
            # A thread that ended since the listing needs no placing.
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, target)


def affinity(pid: int) -> frozenset[int] | None:
    """The CPUs ``pid``'s main thread may run on; None once it is gone."""
    try:
        return frozenset(os.sched_getaffinity(pid))
    except OSError:
        return None


def cpus_allowed(pid: int) -> str | None:
    """``Cpus_allowed_list`` of a process, as the kernel reports it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
