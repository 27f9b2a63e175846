"""Cold fan-out (issue 3): N clients ask two proxies for one cold blob at the same moment.

The engine of the ``cold-fanout`` scenario (:mod:`loadtests.scenarios.cold_fanout`), which runs
it at a size that fits the harness's deadline, and of this module's own command line, which runs
it at any size for a closer look and prints its detailed report.

Everything runs on this machine, over 127.0.0.1 only:

* upstream: Debian's ``docker-registry`` (CNCF distribution 2.8) holding one image whose single
  layer is ``--size-mib`` MiB of random bytes (an uncompressed tar, so the image is genuine);
* proxy ``ocicache``: ``python -m proxy serve`` as a subprocess, with a fresh cache per run;
* proxy ``distribution``: distribution's own pull-through proxy, with fresh storage per run;
* with ``--upstream-mbps X``, a link between the proxies and the upstream: a relay that passes
  X MB/s in total, however many connections share it (:mod:`loadtests.shaper`), standing in for
  the slow site uplink a pull-through cache is for; with ``--per-connection``, X MB/s for each
  connection (a CDN's cap per stream). Without it they reach the upstream directly.

For each proxy and each N, N clients (aiohttp, spread over one worker process per CPU, one
connection each, opened before the clock starts) GET the blob cold at the same moment, read it
whole and check its sha256 (see :mod:`loadtests.clients`).
Then, on the now warm proxy, the same N clients read it again: the warm wall time is what merely
delivering N copies costs on this machine, the floor under any cold number.

Measured per run: upstream bytes (summed from the upstream registry's ``http.response.written``
on its blob GET log lines) over the blob size; wall time from the first request sent to the last
body byte; the slowest client's time to first body byte; the proxy's peak RSS (``VmHWM``) and CPU
time; the clients' CPU time, and the machine's other CPU use (this machine may be shared). A last
run checks memory under stalled clients: 20 clients that read the headers and one byte and then
stop reading, beside one client that reads it all. Every pass over all of this is repeated
(``--repeat``, 5 by default) and the report shows medians.

Run: ``python -m loadtests.fanout [--size-mib 200] [--clients 1,4,20] [--upstream-mbps X
[--per-connection]] [--out FILE]``.
Every wait is bounded, and the whole run by ``--deadline`` (15 minutes by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiohttp

from loadtests.clients import ClientError, ClientGroup, ClientResult, Group, Job, WorkerGroup
from loadtests.fixtures import REPO, make_image, push_image
from loadtests.sampling import (
    cpu_seconds,
    foreign_cpu,
    machine_times,
    process_table,
    tree_cpu_seconds,
    tree_peak_rss,
)
from loadtests.servers import FollowedServer, start_ocicache
from loadtests.shaper import LOOPBACK, MB, ShaperError, ShaperProcess
from tests.support.registry import (
    LoggedRequest,
    Registry,
    count_blob_gets,
    parse_logrus_fields,
    start_registry,
)

ProxyKind = Literal["ocicache", "distribution"]
LoopKind = Literal["uvloop", "asyncio"]
RunKind = Literal["cold", "warm", "stalled"]

MiB: Final = 1024 * 1024
DEFAULT_DEADLINE: Final = 15 * 60.0
# One run (N clients reading one blob) may take at most this long, however much of the overall
# deadline is left: a proxy that stops sending must not eat the whole budget. Over a shaped
# link, at least RUN_TIMEOUT_LINK_FACTOR times what the link needs for the run (run_timeout).
RUN_TIMEOUT: Final = 300.0
RUN_TIMEOUT_LINK_FACTOR: Final = 3.0
# How long the upstream's log may lag behind the last byte it sent before we call it lost.
LOG_TIMEOUT: Final = 60.0
STALLED_CLIENTS: Final = 20
# ocicache's issue-3 targets.
TARGET_UPSTREAM_RATIO: Final = 1.00
TARGET_WALL_RATIO: Final = 1.2
TARGET_TTFB: Final = 0.250
TARGET_STALLED_RSS: Final = 1.0 * MiB

# The proxy's log lines that end a fill.
FILL_END_EVENTS: Final = ("fill_committed", "fill_failed", "fill_disk_error")

_BLOB_GET_RE: Final = re.compile(r"^/v2/.+/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)(?:\?.*)?$")
_VERSION_RE: Final = re.compile(r"(?<![.\w])version=(\S+)")


class BenchError(RuntimeError):
    """A run could not be measured: a proxy did not start, a client got a wrong body, a timeout."""


# --- configuration and results -----------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    size: int  # bytes of random payload in the layer
    clients: tuple[int, ...] = (1, 4, 20)
    proxies: tuple[ProxyKind, ...] = ("ocicache", "distribution")
    stalled: int = STALLED_CLIENTS  # 0: skip the stalled-client check
    warm: bool = True  # also time a warm read after each cold one
    proxy_loop: LoopKind = "uvloop"  # ocicache's --event-loop
    ocicache_args: tuple[str, ...] = ()  # more of ocicache's flags (a --config file, say)
    # Client processes. One process reading and hashing 20 copies saturates a core (measured:
    # 3.5 s of CPU in a 3.6 s run), so the default spreads the clients over every core; 1 runs
    # them in this process.
    client_procs: int = field(default_factory=lambda: os.cpu_count() or 1)
    repeat: int = 5  # passes over every proxy and N; the report shows medians
    # Bytes/s of a shaped link between the proxies and the upstream, shared by all their
    # connections (loadtests.shaper); None: they reach the upstream directly over loopback.
    upstream_rate: float | None = None
    # The rate holds for each connection, not for all together (a CDN that caps each stream).
    per_connection: bool = False
    deadline: float = DEFAULT_DEADLINE
    # Where logs, caches and the upstream's storage go. None: a temp dir, removed after a
    # successful run and kept (its path reported) after a failed one.
    workdir: Path | None = None


@dataclass(frozen=True)
class BlobRef:
    """The blob the clients ask for: the upstream holds it, the proxies fetch it by digest."""

    digest: str
    size: int


@dataclass
class RunResult:
    """One measured run: N clients against one fresh (cold) or just-filled (warm) proxy."""

    proxy: ProxyKind
    scenario: RunKind
    clients: int  # clients that read the whole blob
    stalled: int  # clients that stopped after one byte
    wall: float
    ttfb_max: float
    ttfb_median: float
    peak_rss: int | None  # bytes, the proxy's VmHWM; None for warm runs (the process is reused)
    proxy_cpu: float  # seconds the proxy process spent on CPU during the run
    client_cpu: float  # seconds the client processes spent on CPU during the run
    others_cpu: float  # CPU seconds the machine spent on anything but the proxy, clients, upstream
    upstream_gets: int | None = None  # None for warm runs: they are not supposed to go upstream
    upstream_bytes: int | None = None
    upstream_heads: int | None = None
    upstream_get_seconds: float | None = None  # the longest GET, as the upstream logged it
    # Over a shaped link (cold runs): the bytes it carried from the upstream, headers included,
    # and the relay's CPU seconds.
    link_bytes: int | None = None
    relay_cpu: float | None = None
    rep: int = 0  # the pass it was measured in, from 1


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """Every repetition of one (proxy, scenario, N): medians, and the spread where it matters."""

    proxy: ProxyKind
    scenario: RunKind
    clients: int
    stalled: int
    runs: list[RunResult]

    @property
    def wall(self) -> float:
        return _median([r.wall for r in self.runs])

    @property
    def wall_range(self) -> tuple[float, float]:
        return min(r.wall for r in self.runs), max(r.wall for r in self.runs)

    @property
    def ttfb_slowest(self) -> float:
        """Median over repetitions of the slowest client's TTFB."""
        return _median([r.ttfb_max for r in self.runs])

    @property
    def ttfb_worst(self) -> float:
        return max(r.ttfb_max for r in self.runs)

    @property
    def ttfb_median(self) -> float:
        return _median([r.ttfb_median for r in self.runs])

    @property
    def peak_rss(self) -> float | None:
        peaks = [r.peak_rss for r in self.runs if r.peak_rss is not None]
        return _median(peaks) if peaks else None

    @property
    def proxy_cpu(self) -> float:
        return _median([r.proxy_cpu for r in self.runs])

    @property
    def client_cpu(self) -> float:
        return _median([r.client_cpu for r in self.runs])

    @property
    def others_cpu(self) -> float:
        return _median([r.others_cpu for r in self.runs])

    @property
    def upstream_heads(self) -> list[int]:
        return sorted({r.upstream_heads for r in self.runs if r.upstream_heads is not None})

    @property
    def upstream_get_seconds(self) -> float | None:
        times = [r.upstream_get_seconds for r in self.runs if r.upstream_get_seconds is not None]
        return _median(times) if times else None

    @property
    def upstream_gets(self) -> list[int]:
        return sorted({r.upstream_gets for r in self.runs if r.upstream_gets is not None})

    @property
    def upstream_bytes(self) -> list[int]:
        return [r.upstream_bytes for r in self.runs if r.upstream_bytes is not None]

    @property
    def link_bytes(self) -> list[int]:
        return [r.link_bytes for r in self.runs if r.link_bytes is not None]

    @property
    def relay_cpu(self) -> float | None:
        cpu = [r.relay_cpu for r in self.runs if r.relay_cpu is not None]
        return _median(cpu) if cpu else None


@dataclass
class Report:
    config: BenchConfig
    blob_digest: str
    blob_size: int
    machine: dict[str, str]
    runs: list[RunResult] = field(default_factory=list)
    repetitions: int = 0  # passes completed; fewer than asked if the deadline came first

    def rows(self) -> list[Row]:
        """Runs grouped by (proxy, scenario, N), in the order they were first measured."""
        rows: dict[tuple[str, str, int, int], Row] = {}
        for run in self.runs:
            key = (run.proxy, run.scenario, run.clients, run.stalled)
            if key not in rows:
                rows[key] = Row(run.proxy, run.scenario, run.clients, run.stalled, [])
            rows[key].runs.append(run)
        return list(rows.values())

    def find(self, proxy: ProxyKind, scenario: RunKind, clients: int) -> Row | None:
        for row in self.rows():
            if (row.proxy, row.scenario, row.clients) == (proxy, scenario, clients):
                return row
        return None

    def upstream_ratios(self, row: Row) -> list[float]:
        """Upstream bytes over the blob size, one per repetition."""
        return [b / self.blob_size for b in row.upstream_bytes]

    def link_ratios(self, row: Row) -> list[float]:
        """Bytes the shaped link carried downstream over the blob size, one per repetition."""
        return [b / self.blob_size for b in row.link_bytes]

    @property
    def link_seconds(self) -> float | None:
        """The least time one blob takes over the shaped link; None when there is none."""
        rate = self.config.upstream_rate
        return None if rate is None else self.blob_size / rate

    def wall_ratio(self, row: Row) -> float | None:
        """Median wall time over the same proxy's median cold N=1 wall time."""
        base = self.find(row.proxy, "cold", 1)
        return None if base is None or base.wall <= 0 else row.wall / base.wall

    def cold_over_warm(self, row: Row) -> float | None:
        """A cold run's median wall over the warm one's at the same N: what being cold costs,
        with the cost of merely delivering N copies on this machine divided out."""
        warm = self.find(row.proxy, "warm", row.clients)
        if row.scenario != "cold" or warm is None or warm.wall <= 0:
            return None
        return row.wall / warm.wall

    def rss_growth_per_client(self, row: Row) -> float | None:
        """Median peak RSS over the same proxy's cold N=1 median, per client beyond that run's one."""
        base = self.find(row.proxy, "cold", 1)
        extra = row.stalled if row.scenario == "stalled" else row.clients - 1
        if base is None or base.peak_rss is None or row.peak_rss is None or extra <= 0:
            return None
        return (row.peak_rss - base.peak_rss) / extra

    def markdown(self) -> str:
        return render_markdown(self)


# --- upstream accounting -----------------------------------------------------------------------


@dataclass(frozen=True)
class LogMark:
    lines: int
    requests: int


def log_mark(registry: Registry) -> LogMark:
    return LogMark(len(registry.lines()), len(registry.requests()))


@dataclass(frozen=True)
class UpstreamTraffic:
    """What the upstream registry logged for one blob during a run."""

    get_bytes: tuple[int, ...]  # http.response.written of each GET, in log order
    get_seconds: tuple[float, ...]  # http.response.duration of each GET
    heads: int


_GO_DURATION_UNITS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
_GO_DURATION_RE: Final = re.compile(r"([0-9.]+)(h|ms|m|s|µs|us|ns)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.Duration`` string such as ``1m2.5s`` or ``434.56ms``."""
    parts = _GO_DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_DURATION_UNITS[u] for n, u in parts)


def blob_traffic(lines: Sequence[str], digest: str) -> UpstreamTraffic:
    """The GETs (bytes written, duration) and HEADs of ``digest`` in distribution log lines."""
    get_bytes: list[int] = []
    get_seconds: list[float] = []
    heads = 0
    for line in lines:
        if 'msg="response completed' not in line:
            continue
        f = parse_logrus_fields(line)
        match = _BLOB_GET_RE.match(f.get("http.request.uri", ""))
        if match is None or match["digest"] != digest:
            continue
        method = f.get("http.request.method")
        if method == "HEAD":
            heads += 1
        elif method == "GET":
            get_bytes.append(int(f.get("http.response.written", "0") or 0))
            get_seconds.append(parse_go_duration(f.get("http.response.duration", "0s")))
    return UpstreamTraffic(tuple(get_bytes), tuple(get_seconds), heads)


async def upstream_traffic(
    registry: Registry, mark: LogMark, digest: str, min_gets: int, session: aiohttp.ClientSession
) -> UpstreamTraffic:
    """What the upstream logged for ``digest`` since ``mark``, once its log has caught up.

    Called when the proxy has read every upstream body to its end. The registry logs a request
    when its handler returns, which can be after the client got the last byte; so we wait for
    at least ``min_gets`` GET lines (the proxy's own count: exact, where the proxy keeps one),
    and for a marker request sent only now. The marker's handler starts after a full round trip
    on a new connection, so it logs after every handler that had already written its last
    byte (barring a goroutine descheduled for longer than that round trip); that covers a proxy
    that keeps no count, like distribution, which may make 1 to N+1 GETs.
    """
    marker = f"/v2/?ocicache-bench-marker={uuid.uuid4().hex}"
    async with session.get(f"{registry.url}{marker}") as resp:
        await resp.read()

    def caught_up(reqs: list[LoggedRequest]) -> bool:
        new = reqs[mark.requests :]
        return any(r.path == marker for r in new) and count_blob_gets(new, digest) >= min_gets

    await asyncio.to_thread(registry.wait_for_requests, caught_up, LOG_TIMEOUT)
    return blob_traffic(registry.lines()[mark.lines :], digest)


# --- the proxies under test --------------------------------------------------------------------


@dataclass
class RunningProxy:
    kind: ProxyKind
    url: str
    pid: int
    # Waits until the proxy has finished every upstream transfer the cold run caused; returns
    # how many upstream blob GETs it knows it made (a lower bound for the log to reach).
    settle: Callable[[aiohttp.ClientSession], Awaitable[int]]
    # ocicache's process, whose JSON log lines a scenario may read (how a request was served).
    server: FollowedServer | None = None


@contextlib.asynccontextmanager
async def ocicache_proxy(
    workdir: Path, upstream: str, loop: LoopKind, extra: Sequence[str] = ()
) -> AsyncIterator[RunningProxy]:
    # Info, in JSON (ocicache's defaults, said outright): the fill's own log line is what
    # settle() waits for. It costs one line per request besides, a few dozen per run.
    server = await asyncio.to_thread(
        start_ocicache, workdir, {"docker.io": upstream},
        "--log-level", "info", "--log-format", "json", "--event-loop", loop, *extra, follow_log=True,
    )  # fmt: skip
    try:
        assert isinstance(server, FollowedServer)

        async def settle(session: aiohttp.ClientSession) -> int:
            # A reader gets the final byte once the digest matched, before the fill has fsynced
            # and renamed the file into the cache; the fill logs its end after that. Waiting for
            # that line keeps the commit out of whatever runs next (the warm run), and gives the
            # exact count of upstream GETs for the upstream's log to reach.
            def ended(lines: list[str]) -> bool:
                return any(server.event_fields(FILL_END_EVENTS))

            if not await asyncio.to_thread(server.logged.wait_for, ended, LOG_TIMEOUT):
                raise BenchError(f"ocicache logged no end of its fill; see {server.log}")
            fields = server.event_fields(FILL_END_EVENTS)[0]
            if fields.get("event") != "fill_committed":
                raise BenchError(f"ocicache's fill did not commit: {fields}")
            gets = fields.get("gets")
            return gets if isinstance(gets, int) else 0

        yield RunningProxy("ocicache", server.url(), server.pid, settle, server)
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def distribution_proxy(workdir: Path, upstream: str) -> AsyncIterator[RunningProxy]:
    registry = await asyncio.to_thread(start_registry, workdir / "registry", proxy_remote=upstream)
    try:

        async def settle(session: aiohttp.ClientSession) -> int:
            # distribution stores a miss in a goroutine of its own, beside the fetches that
            # stream to clients, and logs this line when that store is done.
            def stored(lines: list[str]) -> bool:
                return any("Adding new scheduler entry" in line for line in lines)

            if not await asyncio.to_thread(registry.wait_for, stored, LOG_TIMEOUT):
                raise BenchError(f"distribution never stored the blob; log tail:\n{registry.log_tail()}")
            return 1

        yield RunningProxy("distribution", registry.url, registry.proc.pid, settle)
    finally:
        await asyncio.to_thread(registry.stop)


def open_proxy(
    kind: ProxyKind, workdir: Path, upstream: str, config: BenchConfig
) -> contextlib.AbstractAsyncContextManager[RunningProxy]:
    if kind == "ocicache":
        return ocicache_proxy(workdir, upstream, config.proxy_loop, config.ocicache_args)
    return distribution_proxy(workdir, upstream)


# --- clients -----------------------------------------------------------------------------------


@dataclass
class ClientRun:
    whole: list[ClientResult]
    stalled: list[ClientResult]
    client_cpu: float
    proxy_cpu: float
    others_cpu: float
    relay_cpu: float | None = None  # the shaping relay's CPU seconds; None without one

    @property
    def wall(self) -> float:
        starts = [r.sent for r in self.whole + self.stalled]
        ends = [r.done for r in self.whole if r.done is not None]
        return max(ends) - min(starts) if ends and starts else float("nan")

    def ttfbs(self) -> list[float]:
        return [t for r in self.whole + self.stalled if (t := r.ttfb) is not None]


def split(count: int, parts: int) -> list[int]:
    """``count`` as ``parts`` near-equal shares, larger first."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


async def run_clients(
    base_url: str,
    pid: int,
    upstream_pid: int,
    digest: str,
    size: int,
    whole: int,
    stalled: int,
    procs: int,
    *,
    relay_pid: int | None = None,
    timeout: float = RUN_TIMEOUT,
) -> ClientRun:
    """``whole`` clients read the blob to its end and ``stalled`` stop after one byte; all send at
    once. With ``procs`` > 1 the clients are spread over that many worker processes. Returns
    when the whole readers are done, after letting the stalled ones go. ``pid`` is the proxy's
    process, ``upstream_pid`` the upstream registry's and ``relay_pid`` the shaping relay's, if
    any: their CPU time is measured, and what the machine spent beyond them and the clients is
    reported as others' (a noisy-neighbour gauge). ``timeout`` bounds each client's request."""
    path = f"/v2/{REPO}/blobs/{digest}"
    jobs = [
        Job(base_url, path, digest, size, w, s, timeout)
        for w, s in zip(split(whole, procs), split(stalled, procs), strict=True)
        if w or s
    ]
    groups: list[Group] = [WorkerGroup(j) if procs > 1 else ClientGroup(j) for j in jobs]

    def sample() -> tuple[float, float, float, float]:
        relay = cpu_seconds(relay_pid) if relay_pid is not None else 0.0
        return time.process_time(), tree_cpu_seconds(pid), cpu_seconds(upstream_pid), relay

    try:
        await asyncio.gather(*(g.connect() for g in groups))
        table0, machine0 = process_table(), machine_times()
        before = sample()
        for group in groups:
            await group.go()
        try:
            done = await asyncio.gather(*(g.whole_done() for g in groups))
            after = sample()
            # Other load: every process outside the harness, and the hypervisor's steal. The
            # proxy, upstream, relay and clients are all below this process.
            others = foreign_cpu(table0, process_table()) + (machine_times() - machine0).steal
        finally:
            stalls = await asyncio.gather(*(g.release() for g in groups), return_exceptions=True)
    finally:
        await asyncio.gather(*(g.close() for g in groups), return_exceptions=True)
    results = [r for rs, _ in done for r in rs]
    stalled_results: list[ClientResult] = []
    for item in stalls:
        if isinstance(item, BaseException):
            raise BenchError(f"stalled clients: {item!r}")
        stalled_results += item
    failed = [r.error for r in results + stalled_results if r.error is not None]
    if failed:
        raise BenchError(f"{len(failed)} client(s) failed, first: {failed[0]}")
    own_cpu, proxy_cpu, _upstream_cpu, relay_cpu = (b - a for a, b in zip(before, after, strict=True))
    # In-process clients use this process's CPU; workers report their own.
    client_cpu = own_cpu if procs <= 1 else sum(cpu for _, cpu in done)
    return ClientRun(
        results, stalled_results, client_cpu, proxy_cpu, others, relay_cpu if relay_pid is not None else None
    )


def _result(proxy: ProxyKind, scenario: RunKind, run: ClientRun, peak: int | None) -> RunResult:
    ttfbs = run.ttfbs()
    return RunResult(
        proxy=proxy,
        scenario=scenario,
        clients=len(run.whole),
        stalled=len(run.stalled),
        wall=run.wall,
        ttfb_max=max(ttfbs),
        ttfb_median=statistics.median(ttfbs),
        peak_rss=peak,
        proxy_cpu=run.proxy_cpu,
        client_cpu=run.client_cpu,
        others_cpu=run.others_cpu,
        relay_cpu=run.relay_cpu,
    )


# --- the benchmark -----------------------------------------------------------------------------


@dataclass
class Upstream:
    """The upstream registry, and the shaped link the proxies reach it through, if any."""

    registry: Registry
    link: ShaperProcess | None = None

    @property
    def url(self) -> str:
        """The proxies' upstream: the link if there is one. Pushes and markers go direct."""
        return self.link.url if self.link is not None else self.registry.url


def run_timeout(config: BenchConfig, size: int, fetches: int) -> float:
    """The bound on one run that makes ``fetches`` upstream fetches of ``size`` bytes."""
    if config.upstream_rate is None:
        return RUN_TIMEOUT
    return max(RUN_TIMEOUT, RUN_TIMEOUT_LINK_FACTOR * fetches * size / config.upstream_rate)


async def _one_proxy_run(
    kind: ProxyKind,
    workdir: Path,
    upstream: Upstream,
    layer: BlobRef,
    config: BenchConfig,
    whole: int,
    stalled: int,
    session: aiohttp.ClientSession,
) -> list[RunResult]:
    """A fresh proxy; a cold run (with ``stalled`` stalling clients); then, if asked, a warm one."""
    results: list[RunResult] = []
    await asyncio.to_thread(workdir.mkdir, parents=True)
    # Write back what earlier runs left dirty (caches of up to 200 MiB, removed or not), so
    # that it does not land in the middle of this run and its fsync: without this, wall times
    # of identical runs varied 3x here.
    await asyncio.to_thread(os.sync)
    registry, link = upstream.registry, upstream.link
    # distribution fetches once per client it streams to and once more to store the blob.
    timeout = run_timeout(config, layer.size, whole + stalled + 1)
    try:
        async with open_proxy(kind, workdir, upstream.url, config) as proxy:

            async def measure(stalling: int) -> ClientRun:
                async with asyncio.timeout(timeout):
                    return await run_clients(
                        proxy.url, proxy.pid, registry.proc.pid, layer.digest, layer.size,
                        whole, stalling, config.client_procs,
                        relay_pid=link.pid if link is not None else None, timeout=timeout,
                    )  # fmt: skip

            mark = log_mark(registry)
            link_before = await link.counters() if link is not None else None
            cold = await measure(stalled)
            min_gets = await proxy.settle(session)
            # Read before the warm run, which reuses this process and could raise its peak.
            peak = tree_peak_rss(proxy.pid)
            if peak is None:
                raise BenchError(f"{kind} exited during the run")
            traffic = await upstream_traffic(registry, mark, layer.digest, min_gets, session)
            row = _result(kind, "stalled" if stalled else "cold", cold, peak)
            row.upstream_gets, row.upstream_bytes = len(traffic.get_bytes), sum(traffic.get_bytes)
            row.upstream_heads = traffic.heads
            row.upstream_get_seconds = max(traffic.get_seconds, default=None)
            if link is not None and link_before is not None:
                # The proxy has settled, so every byte it took from the link has been counted
                # (the relay counts a byte before passing it on).
                row.link_bytes = (await link.counters()).down - link_before.down
            results.append(row)
            if config.warm and not stalled:
                results.append(_result(kind, "warm", await measure(0), None))
    finally:
        # Each run gets a fresh cache; don't let N copies of a 200 MiB blob pile up on disk.
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def machine_info(config: BenchConfig, registry_version: str) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
    shared = "for each connection on its own" if config.per_connection else "one bucket shared by all"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ocicache loop": config.proxy_loop
        + (f", flags {' '.join(config.ocicache_args)}" if config.ocicache_args else ""),
        "clients": (
            f"aiohttp {aiohttp.__version__} on uvloop in {config.client_procs} worker processes"
            if config.client_procs > 1
            else f"aiohttp {aiohttp.__version__} on {loop} in the benchmark process"
        ),
        "upstream": f"docker-registry {registry_version}",
        "link": (
            "direct (loopback, unshaped)"
            if config.upstream_rate is None
            else f"shaped to {config.upstream_rate / MB:g} MB/s each way, "
            f"{shared} (loadtests/shaper.py, in its own process)"
        ),
    }


async def run_benchmark(config: BenchConfig, progress: Callable[[str], None] | None = None) -> Report:
    """Run every configured measurement and return the report; the core of the CLI and the test."""
    say = progress or (lambda _msg: None)
    root = config.workdir or Path(tempfile.mkdtemp(prefix="ocicache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        async with asyncio.timeout(config.deadline):
            report = await _run(config, root, say)
        ok = True
        return report
    finally:
        if ok and config.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            say(f"logs kept in {root}")


async def _one_pass(
    config: BenchConfig,
    root: Path,
    upstream: Upstream,
    layer: BlobRef,
    session: aiohttp.ClientSession,
    say: Callable[[str], None],
) -> list[RunResult]:
    runs: list[RunResult] = []
    for kind in config.proxies:
        for n in config.clients:
            say(f"  {kind}, {n} client(s)")
            runs += await _one_proxy_run(kind, root / f"{kind}-{n}", upstream, layer, config, n, 0, session)
    if config.stalled and "ocicache" in config.proxies:
        say(f"  ocicache, 1 client beside {config.stalled} stalled ones")
        work = root / "ocicache-stalled"
        runs += await _one_proxy_run("ocicache", work, upstream, layer, config, 1, config.stalled, session)
    return runs


async def _run(config: BenchConfig, root: Path, say: Callable[[str], None]) -> Report:
    say(f"building a {config.size / MiB:g} MiB layer")
    image = await asyncio.to_thread(make_image, (config.size,))
    (layer,) = image.layers
    registry = await asyncio.to_thread(start_registry, root / "upstream")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=RUN_TIMEOUT)) as session:
            # Pushes go direct: only the proxies' traffic crosses the shaped link.
            say(f"pushing {layer.digest} ({layer.size} bytes) to {registry.url}")
            await push_image(session, registry.url, image)
            return await run_on(config, root, registry, BlobRef(layer.digest, layer.size), session, say)
    finally:
        await asyncio.to_thread(registry.stop)


async def run_on(
    config: BenchConfig,
    root: Path,
    registry: Registry,
    blob: BlobRef,
    session: aiohttp.ClientSession,
    say: Callable[[str], None],
) -> Report:
    """Every pass of ``config`` against ``registry``, which already holds ``blob`` (any blob:
    the proxies are asked for it by digest); the link, if the config asks for one, is started
    here and stopped on the way out. Scenarios that compare several configs on one upstream
    call this once per config; :func:`run_benchmark` calls it once."""
    started = time.monotonic()
    upstream = Upstream(registry)
    async with contextlib.AsyncExitStack() as stack:
        if config.upstream_rate is not None:
            link = ShaperProcess(
                (LOOPBACK, registry.port), config.upstream_rate, per_connection=config.per_connection
            )
            upstream.link = await stack.enter_async_context(link)
            each = "each connection" if config.per_connection else "shared"
            say(f"upstream link: {config.upstream_rate / MB:g} MB/s, {each}, through {link.url}")
        version = next((m[1] for line in registry.lines() if (m := _VERSION_RE.search(line))), "?")
        report = Report(config, blob.digest, blob.size, machine_info(config, version))
        longest_pass = 0.0
        for rep in range(1, config.repeat + 1):
            # Passes are whole (every proxy and N once), so that a cut-short benchmark still
            # reports every row; and interleaved, so that slow drift on a shared machine
            # spreads over all rows instead of landing on one.
            left = config.deadline - (time.monotonic() - started)
            if rep > 1 and left < 1.5 * longest_pass:
                say(f"stopping after {rep - 1} passes: {left:.0f} s left of the deadline")
                break
            pass_started = time.monotonic()
            say(f"pass {rep} of {config.repeat}")
            runs = await _one_pass(config, root, upstream, blob, session, say)
            for run in runs:
                run.rep = rep
            report.runs += runs
            report.repetitions = rep
            longest_pass = max(longest_pass, time.monotonic() - pass_started)
        return report


# --- the report --------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or value != value else format(value, spec)


def _span(values: Sequence[float], spec: str) -> str:
    if not values:
        return "–"
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}–{high}"


def _label(row: Row) -> str:
    return f"{row.clients}+{row.stalled} stalled" if row.stalled else str(row.clients)


def render_markdown(report: Report) -> str:
    cfg = report.config
    m = report.machine
    reps = report.repetitions
    link_s = report.link_seconds
    shaped = link_s is not None
    lines = [
        "## Cold-blob single-flight benchmark",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}; "
        f"ocicache event loop: {m['ocicache loop']}; clients: {m['clients']}; "
        f"upstream: {m['upstream']}; proxies' link to it: {m['link']}; everything on 127.0.0.1.",
        f"Blob: {report.blob_size} bytes ({report.blob_size / MiB:.2f} MiB, a tar of random bytes), "
        f"`{report.blob_digest}`"
        + (f", at least {link_s:.2f} s over the link" if link_s is not None else "")
        + f". {reps} pass{'es' if reps != 1 else ''}"
        f"{f' (of {cfg.repeat} asked)' if reps < cfg.repeat else ''}; each cell is the median over "
        "them, except where a range is shown.",
        "",
        "| proxy | run | N | upstream GETs | upstream bytes / blob | wall (s) | wall range (s) "
        "| wall / cold N=1 | cold / warm |"
        + (" wall / link time |" if shaped else "")
        + " slowest TTFB (ms) | worst TTFB (ms) | median TTFB (ms) |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: |"
        + (" --: |" if shaped else "")
        + " --: | --: | --: |",
    ]
    rows = report.rows()
    for row in rows:
        low, high = row.wall_range
        over_link = f" {_fmt(row.wall / link_s, '.2f')} |" if link_s is not None else ""
        lines.append(
            f"| {row.proxy} | {row.scenario} | {_label(row)} | {_span(row.upstream_gets, 'd')} "
            f"| {_span(report.upstream_ratios(row), '.2f')} | {row.wall:.2f} | {low:.2f}–{high:.2f} "
            f"| {_fmt(report.wall_ratio(row), '.2f')} | {_fmt(report.cold_over_warm(row), '.2f')} |"
            f"{over_link} {row.ttfb_slowest * 1000:.0f} | {row.ttfb_worst * 1000:.0f} "
            f"| {row.ttfb_median * 1000:.0f} |"
        )
    lines += [
        "",
        "| proxy | run | N | proxy peak RSS (MiB) | RSS growth / client vs N=1 (MiB) | proxy CPU (s) "
        "| client CPU (s) | others' CPU (s) | upstream HEADs | longest upstream GET (s) |"
        + (" link bytes / blob | relay CPU (s) |" if shaped else ""),
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: |" + (" --: | --: |" if shaped else ""),
    ]
    for row in rows:
        growth = report.rss_growth_per_client(row)
        link_cells = (
            f" {_span(report.link_ratios(row), '.2f')} | {_fmt(row.relay_cpu, '.2f')} |" if shaped else ""
        )
        lines.append(
            f"| {row.proxy} | {row.scenario} | {_label(row)} "
            f"| {_fmt(None if row.peak_rss is None else row.peak_rss / MiB, '.1f')} "
            f"| {_fmt(None if growth is None else growth / MiB, '.2f')} "
            f"| {row.proxy_cpu:.2f} | {row.client_cpu:.2f} | {row.others_cpu:.2f} "
            f"| {_span(row.upstream_heads, 'd')} | {_fmt(row.upstream_get_seconds, '.2f')} |{link_cells}"
        )
    lines += [
        "",
        "Cold: a fresh proxy with an empty cache. Warm: the same N clients again right after, on "
        "the proxy that just filled its cache — what delivering N verified copies costs on this "
        "machine, with no upstream involved. Wall: first request sent to last body byte. TTFB: a "
        "client's request to its first body byte; slowest: the slowest client's, median over "
        "passes; worst: the slowest client's in any pass. Upstream GETs, HEADs and bytes (every "
        "pass's value shown) and GET durations come from the upstream registry's log. RSS: the "
        "proxy process's VmHWM; growth: (peak − cold N=1 peak) / the clients beyond the first "
        "(N − 1, or the stalled ones). CPU: seconds used during the run by the proxy process, by "
        "all client processes, and by every other process except the upstream"
        + (" and the relay" if shaped else "")
        + ", plus CPU stolen by the hypervisor (softirq time, mostly loopback TCP, is left out): a "
        "high value marks a run disturbed by other load on the machine.",
    ]
    if shaped:
        lines += [
            "",
            "Link: the proxies reach the upstream through a relay that passes at most the link's "
            "rate in each direction, shared by all their connections, like a site's uplink. Link "
            "time: the blob's size over that rate. Link bytes: what the relay carried from the "
            "upstream during the cold run, response heads included; equal to the upstream bytes "
            "up to those heads, it shows the proxy's traffic did cross the link.",
        ]
    targets = target_checks(report)
    if targets:
        lines += ["", "| ocicache target (issue 3) | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets]
    if cfg.size < 64 * MiB:
        lines += ["", f"(A {cfg.size / MiB:g} MiB blob: a smoke run, not a measurement.)"]
    return "\n".join(lines) + "\n"


def target_checks(report: Report) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for ocicache's issue-3 targets, where the runs allow judging."""
    checks: list[tuple[str, str, bool]] = []
    cold = [r for r in report.rows() if r.proxy == "ocicache" and r.scenario == "cold"]
    if cold:
        shown = ", ".join(f"N={r.clients}: {_span(report.upstream_ratios(r), '.2f')}" for r in cold)
        met = all(
            format(x, ".2f") == format(TARGET_UPSTREAM_RATIO, ".2f")
            for r in cold
            for x in report.upstream_ratios(r)
        )
        checks.append(("upstream bytes / blob = 1.00 at every N", shown, met))
    biggest = max(cold, key=lambda r: r.clients, default=None)
    if biggest is not None and biggest.clients > 1 and (ratio := report.wall_ratio(biggest)) is not None:
        notes = []
        if (warm := report.cold_over_warm(biggest)) is not None:
            notes.append(f"cold / warm at N={biggest.clients}: {warm:.2f}x")
        base = report.find("ocicache", "cold", 1)
        fill_n, fill_1 = biggest.upstream_get_seconds, base.upstream_get_seconds if base else None
        if fill_n is not None and fill_1:
            notes.append(f"upstream GET time N={biggest.clients} / N=1: {fill_n / fill_1:.2f}x")
        if (link_s := report.link_seconds) is not None:
            notes.append(f"wall / link time at N={biggest.clients}: {biggest.wall / link_s:.2f}x")
        note = f" ({'; '.join(notes)})" if notes else ""
        checks.append(
            (f"wall at N={biggest.clients} within {TARGET_WALL_RATIO}x of N=1", f"{ratio:.2f}x{note}",
             ratio <= TARGET_WALL_RATIO)
        )  # fmt: skip
    joined = [r for r in cold if r.clients > 1]
    if joined:
        worst = max(joined, key=lambda r: r.ttfb_worst)
        checks.append(
            (f"TTFB of a joining client < {TARGET_TTFB * 1000:.0f} ms",
             f"{worst.ttfb_worst * 1000:.0f} ms (slowest client of any pass, N={worst.clients})",
             worst.ttfb_worst < TARGET_TTFB)
        )  # fmt: skip
    stalled = report.find("ocicache", "stalled", 1)
    if stalled is not None and (growth := report.rss_growth_per_client(stalled)) is not None:
        checks.append(
            (f"RSS growth < {TARGET_STALLED_RSS / MiB:g} MiB per stalled client",
             f"{growth / MiB:.2f} MiB", growth < TARGET_STALLED_RSS)
        )  # fmt: skip
    return checks


# --- command line ------------------------------------------------------------------------------


def _clients(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") from exc
    if not values or any(v < 1 or v > 200 for v in values):
        raise argparse.ArgumentTypeError("client counts must be between 1 and 200")
    if 1 not in values:
        # Every ratio in the report is against N=1.
        values = (1, *values)
    return tuple(sorted(set(values)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.fanout", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=float, default=200.0, help="layer payload size in MiB (default 200)")
    p.add_argument("--clients", type=_clients, default=(1, 4, 20), help="client counts (default 1,4,20)")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument(
        "--proxies", default="ocicache,distribution", help="which proxies (default ocicache,distribution)"
    )
    p.add_argument("--stalled", type=int, default=STALLED_CLIENTS, help="stalled clients; 0 skips the check")
    p.add_argument("--no-warm", action="store_true", help="skip the warm reference runs")
    p.add_argument(
        "--client-procs",
        type=int,
        default=os.cpu_count() or 1,
        help="client processes (default: one per CPU; 1 runs the clients in this process)",
    )
    p.add_argument("--proxy-loop", choices=("uvloop", "asyncio"), default="uvloop", help="ocicache's loop")
    p.add_argument(
        "--ocicache-arg",
        action="append",
        default=[],
        help="one more flag for ocicache, repeatable (e.g. --ocicache-arg=--config --ocicache-arg=FILE)",
    )
    p.add_argument(
        "--upstream-mbps",
        type=float,
        help="put a link of this many megabytes (10^6 bytes) per second, shared by all their "
        "connections, between the proxies and the upstream (default: direct, unshaped)",
    )
    p.add_argument(
        "--per-connection",
        action="store_true",
        help="with --upstream-mbps: the rate holds for each connection on its own (a CDN's cap per stream)",
    )
    p.add_argument("--repeat", type=int, default=5, help="passes; the report shows medians (default 5)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds for the whole run")
    p.add_argument("--workdir", type=Path, help="keep everything under this directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.upstream_mbps is not None and not 0.01 <= ns.upstream_mbps <= 100_000:
        parser().error("--upstream-mbps must be between 0.01 and 100000")
    proxies: list[ProxyKind] = []
    for name in ns.proxies.split(","):
        if name not in ("ocicache", "distribution"):
            parser().error(f"unknown proxy {name!r}")
        proxies.append("ocicache" if name == "ocicache" else "distribution")
    config = BenchConfig(
        size=int(ns.size_mib * MiB),
        clients=ns.clients,
        proxies=tuple(proxies),
        stalled=max(0, min(ns.stalled, 200)),
        warm=not ns.no_warm,
        proxy_loop=ns.proxy_loop,
        ocicache_args=tuple(ns.ocicache_arg),
        client_procs=max(1, min(ns.client_procs, 64)),
        repeat=max(1, min(ns.repeat, 50)),
        deadline=ns.deadline,
        workdir=ns.workdir,
        upstream_rate=None if ns.upstream_mbps is None else ns.upstream_mbps * MB,
        per_connection=ns.per_connection,
    )

    def progress(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    import uvloop

    # uvloop here too: with --client-procs 1 this process runs the clients, and the cheaper its
    # loop, the less of the measured time is the clients' own.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            report = runner.run(run_benchmark(config, progress))
        except (BenchError, ClientError, ShaperError, TimeoutError) as exc:
            print(f"fanout: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    text = report.markdown()
    print(text)
    if ns.out is not None:
        ns.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
