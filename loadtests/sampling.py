"""Machine sampling: CPU time of processes and of the whole machine, memory, and other load.

Every figure the harness reports says what else was running. Client and servers share this
machine's cores, so a client that costs CPU takes it from the server, and a neighbour (another
session's test run, a hypervisor's other guests) takes it from both. :class:`Meter` measures one
window: the servers' CPU, the machine's busy and stolen time, and the CPU of every process that
is not this harness or something it started.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

TICK: Final = os.sysconf("SC_CLK_TCK")
KTHREADD: Final = 2


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, all its threads included; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses; the fields after its last ')' do not.
    fields = stat.rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of proc(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / TICK


def _status_kib(pid: int, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def peak_rss(pid: int) -> int | None:
    """The process's peak resident set (VmHWM) in bytes; None once it is gone."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def rss(pid: int) -> int | None:
    """The process's resident set now (VmRSS) in bytes; None once it is gone."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and every live process below it (``serve``'s workers)."""
    return sum(cpu_seconds(p) for p in descendants(process_table(), pid))


def tree_peak_rss(pid: int) -> int | None:
    """The peaks of ``pid`` and every process below it (``serve``'s workers), added up: an
    upper bound on what they held at once, since their peaks need not coincide. None once
    ``pid`` is gone."""
    own = peak_rss(pid)
    if own is None:
        return None
    return own + sum(peak_rss(p) or 0 for p in descendants(process_table(), pid) - {pid})


def tree_rss(pid: int) -> int | None:
    """The resident sets of ``pid`` and every process below it, now, added up."""
    own = rss(pid)
    if own is None:
        return None
    return own + sum(rss(p) or 0 for p in descendants(process_table(), pid) - {pid})


def children_cpu() -> float:
    """CPU of this process's children that have been waited for (rusage accumulates them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class MachineTimes:
    """Seconds since boot, summed over every CPU."""

    busy: float  # user, nice, system, irq and softirq: the kernel's loopback TCP work included
    steal: float  # time the hypervisor gave to other guests

    def __sub__(self, other: MachineTimes) -> MachineTimes:
        return MachineTimes(self.busy - other.busy, self.steal - other.steal)


def machine_times() -> MachineTimes:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return MachineTimes((user + nice + system + irq + softirq) / TICK, steal / TICK)


ProcessTable = dict[int, tuple[int, float]]  # pid -> (parent pid, CPU seconds)


def process_table() -> ProcessTable:
    """Every user-space process now alive, with its parent and CPU time."""
    found: ProcessTable = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone since the listing
        pid, ppid = int(entry.name), int(fields[1])
        # Kernel threads: ksoftirqd does our own loopback work, and kworkers our disk writes.
        if pid == KTHREADD or ppid == KTHREADD:
            continue
        found[pid] = (ppid, (int(fields[11]) + int(fields[12])) / TICK)
    return found


def descendants(table: ProcessTable, root: int) -> set[int]:
    """``root`` and every process below it in ``table``."""
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for kid in kids.get(todo.pop(), []):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def foreign_cpu(before: ProcessTable, after: ProcessTable) -> float:
    """CPU seconds spent between two snapshots by processes this harness did not start.

    Everything below this process (servers, clients, the upstream, the relay, nginx's workers)
    is ours; the rest is a neighbour sharing the cores, which skews whatever ran meanwhile.
    """
    ours = descendants(after, os.getpid()) | descendants(before, os.getpid())
    total = 0.0
    for pid, (ppid, cpu) in after.items():
        if pid not in ours:
            total += max(0.0, cpu - before.get(pid, (ppid, 0.0))[1])
    return total


def children_of(pid: int) -> list[int]:
    return [p for p, (ppid, _) in process_table().items() if ppid == pid]


@dataclass(frozen=True)
class Usage:
    """What one measured window cost, in CPU seconds, and how long it was."""

    seconds: float  # wall time of the window (client start-up included)
    server_cpu: float
    client_cpu: float
    machine_busy: float  # all cores, softirq included: servers, clients and the kernel between
    steal: float
    foreign: float  # processes outside this harness

    def cores(self, cpu: float) -> float:
        return cpu / self.seconds if self.seconds > 0 else 0.0

    def as_cores(self) -> dict[str, float]:
        return {
            "server": round(self.cores(self.server_cpu), 3),
            "client": round(self.cores(self.client_cpu), 3),
            "machine_busy": round(self.cores(self.machine_busy), 3),
            "steal": round(self.cores(self.steal), 3),
            "others": round(self.cores(self.foreign), 3),
        }


class Meter:
    """Samples the servers' processes, the machine and its other processes around one window."""

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self._server0 = 0.0
        self._machine0 = MachineTimes(0.0, 0.0)
        self._table0: ProcessTable = {}
        self._start = 0.0

    def _server(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.server_pids)

    def __enter__(self) -> Self:
        self._table0 = process_table()
        self._server0 = self._server()
        self._machine0 = machine_times()
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def usage(self, client_cpu: float) -> Usage:
        """The window so far, in which the client used ``client_cpu``."""
        seconds = time.monotonic() - self._start
        machine = machine_times() - self._machine0
        server = self._server() - self._server0
        foreign = foreign_cpu(self._table0, process_table())
        return Usage(seconds, server, client_cpu, machine.busy, machine.steal, foreign)
