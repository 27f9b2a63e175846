"""Warm-path benchmark: how fast ocicache serves a blob it already holds, next to nginx.

Everything runs on this machine, over 127.0.0.1 only, in one run:

* one file of ``--size-mib`` MiB of random bytes, hard-linked (same inode, so the same page
  cache pages) into nginx's document root and into each proxy's cache;
* ``nginx``: a private instance (own config, ``-p`` prefix, ``daemon off``, ``sendfile on``, two
  workers, no access log) serving the file at the same path as the proxy;
* ``ocicache``: ``python -m proxy serve`` as a subprocess, once with ``--event-loop uvloop`` and
  once with ``--event-loop asyncio``, its cache holding the blob and the record that
  ``library/bench`` holds it, so that the warm path never needs an upstream (the upstream given
  is a closed port);
* a load generator with ``--connections`` keep-alive connections for ``--seconds`` per
  measurement: ``wrk`` (default), bounded loops of ``curl``, or ``sink``, this module's own
  reader (large ``recv_into`` buffers: a client that costs less CPU per byte than wrk, whose
  reads are 8 KiB).

Two workloads: the whole blob, and ``Range: bytes=0-<range>`` (1 MiB by default) repeated.
Servers are measured interleaved (nginx, ocicache-uvloop, ocicache-asyncio, then again) so that
drift in the machine hits all of them alike. Throughput is bytes received / seconds, with
GB = 10^9 bytes. Client and servers share this machine's cores, so each row also shows the CPU
that server and client used, all cores' busy time (the kernel's loopback work included), and the
CPU of processes outside the benchmark: anything else running at the same time skews the numbers,
and the report says so.

Before timing, every server's answers are checked once: the whole body hashes to the digest,
the range body equals the file's first bytes.

Run: ``python -m loadtests.bench_warm [--size-mib 100] [--connections 8] [--seconds 10]
[--rounds 2] [--client wrk|curl|sink] [--out FILE]``. Every wait and loop is bounded in time
and in count; the run stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import http.client
import os
import platform
import pwd
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from proxy.core.reference import Digest
from proxy.store.seed import seed
from proxy.store.storage import Storage

ClientKind = Literal["wrk", "curl", "sink"]

MiB: Final = 1024 * 1024
GB: Final = 1e9
UPSTREAM: Final = "docker.io"
REPO: Final = "library/bench"
ROOT: Final = Path(__file__).resolve().parent.parent
NGINX: Final = "/usr/sbin/nginx"
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0
# A response that stalls this long is an error, not a slow measurement.
IO_TIMEOUT: Final = 30.0
# Time a client may take beyond its --seconds (process start-up, the last curl transfer).
CLIENT_GRACE: Final = 60.0
# The sink reads into one buffer this large: few syscalls per byte, as a fast client would.
SINK_BUFFER: Final = 1 * MiB
HEAD_MAX: Final = 64 * 1024
# Hard caps on counts, so that no loop relies on the clock alone.
MAX_RESPONSES_PER_CONNECTION: Final = 10_000_000
MAX_CURL_BATCHES: Final = 100_000
# One curl invocation fetches this many bytes (several URLs on one connection), so that a process
# start-up is paid per batch, not per small range response.
CURL_BATCH_BYTES: Final = 256 * MiB
CURL_BATCH_MAX_URLS: Final = 200
NGINX_PORT_TRIES: Final = 3
# Cores used by processes outside the benchmark beyond which the report says it was disturbed.
NOISY: Final = 0.05

_LISTENING_RE: Final = re.compile(r"ocicache listening on http://127\.0\.0\.1:(\d+)")
_WRK_RE: Final = re.compile(r"^BENCH (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", re.MULTILINE)

# wrk prints its own summary with rounded units; this prints the exact counters instead.
# errors.status counts answers >= 400; connect/read/write/timeout count broken connections.
_WRK_SCRIPT: Final = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %d\\n",
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class BenchError(RuntimeError):
    """The benchmark could not run: a server did not start or gave a wrong answer."""


# --- configuration and results -------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    size: int = 100 * MiB
    connections: int = 8
    seconds: float = 10.0
    rounds: int = 2
    client: ClientKind = "wrk"
    wrk_threads: int = 2
    range_bytes: int = 1 * MiB  # 0: no range workload
    loops: tuple[str, ...] = ("uvloop", "asyncio")  # ocicache's --event-loop values
    workdir: Path | None = None  # None: a temp dir, removed afterwards


@dataclass(frozen=True)
class Workload:
    name: str
    range_header: str | None
    status: int
    body: int  # bytes in each complete response's body


@dataclass(frozen=True)
class ClientRun:
    """What one load generator run saw."""

    seconds: float
    bytes: int  # bytes received; wrk counts headers too, curl and sink count bodies only
    responses: int  # complete responses (wrk: requests it finished)
    bad: int  # wrong status, short body, broken connection
    cpu: float  # CPU seconds the client spent


@dataclass(frozen=True)
class Measurement:
    server: str
    workload: str
    round: int
    run: ClientRun
    server_cpu: float  # CPU seconds the server's processes spent during the run
    # CPU seconds all cores were busy during the run: servers, client, and the kernel's loopback
    # work in softirq context, which /proc often charges to no process at all.
    machine_busy: float
    steal: float  # CPU seconds the hypervisor gave to others
    foreign: float  # CPU seconds of processes outside this benchmark

    @property
    def gbps(self) -> float:
        return self.run.bytes / self.run.seconds / GB if self.run.seconds > 0 else 0.0


@dataclass
class Report:
    config: BenchConfig
    digest: str
    servers: list[str]
    workloads: list[Workload]
    machine: dict[str, str]
    shared_inode: bool
    measurements: list[Measurement] = field(default_factory=list)

    def of(self, server: str, workload: str) -> list[Measurement]:
        return [m for m in self.measurements if m.server == server and m.workload == workload]

    def mean_gbps(self, server: str, workload: str) -> float:
        ms = self.of(server, workload)
        return statistics.fmean(m.gbps for m in ms) if ms else 0.0

    def ratio(self, server: str, workload: str, baseline: str = "nginx") -> float | None:
        """Median over rounds of this server's GB/s over the baseline's in the same round.

        The machine's speed drifts by tens of percent from one minute to the next (seen here:
        the same server at 1.7 and 3.8 GB/s in consecutive rounds); a server is compared with
        the baseline measured next to it, not with an average over other moments.
        """
        base = {m.round: m.gbps for m in self.of(baseline, workload)}
        ratios = [m.gbps / base[m.round] for m in self.of(server, workload) if base.get(m.round, 0) > 0]
        return statistics.median(ratios) if ratios else None

    @property
    def bad(self) -> int:
        return sum(m.run.bad for m in self.measurements)


# --- processes ----------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses; the fields after its last ')' do not.
    fields = stat.rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """Seconds every core spent busy (softirq included) and stolen by the hypervisor, so far."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already inside user/nice]
    busy = sum(values[:8]) - values[3] - values[4] - values[7]
    return busy / os.sysconf("SC_CLK_TCK"), values[7] / os.sysconf("SC_CLK_TCK")


def _process_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every user-space process now alive."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone since the listing
        ppid = int(fields[1])
        # Kernel threads (children of kthreadd, pid 2) do our own loopback work in ksoftirqd.
        if ppid == 2 or int(entry.name) == 2:
            continue
        found[int(entry.name)] = (ppid, (int(fields[11]) + int(fields[12])) / tick)
    return found


def _foreign_cpu(
    before: dict[int, tuple[int, float]], after: dict[int, tuple[int, float]], ours: set[int]
) -> float:
    """CPU seconds spent between two snapshots by processes that are not part of this benchmark.

    Another benchmark running beside this one shares the same cores and skews every number;
    this makes it visible instead of silently slowing whichever server was measured then.
    """
    me = os.getpid()
    total = 0.0
    for pid, (ppid, cpu) in after.items():
        if pid in ours or pid == me or ppid == me:
            continue
        total += cpu - before.get(pid, (ppid, 0.0))[1]
    return total


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _children_cpu() -> float:
    """CPU of this process's children that have been waited for (rusage accumulates them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    pids: list[int]  # whose CPU counts as this server's (nginx: master and workers)

    def cpu(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.pids)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        # Only the process we started, by its id; nginx's master takes its workers with it.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
        time.sleep(0.05)
    return False


def _nginx_conf(prefix: Path, docroot: Path, port: int, workers: int) -> str:
    # Temp paths inside the prefix: the compiled-in ones are the system instance's.
    temps = "\n".join(
        f"  {kind}_temp_path {prefix / ('tmp-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # A master run as root drops its workers to "nobody", who may not be able to reach the
    # document root (pytest's temp dirs are 0700, for one). The workers serve only our own file
    # on loopback, so they keep the identity of whoever runs the benchmark.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    return f"""\
{user}worker_processes {workers};
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  # The Range workload makes thousands of requests per connection; the default (1000) would
  # make nginx, and only nginx, pay for reconnecting.
  keepalive_requests 100000000;
  keepalive_timeout 75s;
  default_type application/octet-stream;
{temps}
  server {{
    listen 127.0.0.1:{port};
    root {docroot};
  }}
}}
"""


def start_nginx(prefix: Path, docroot: Path, workers: int) -> Server:
    prefix.mkdir(parents=True, exist_ok=True)
    log = prefix / "error.log"
    last = ""
    # The port is chosen before nginx binds it; another process may take it in between.
    for _ in range(NGINX_PORT_TRIES):
        port = _free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(_nginx_conf(prefix, docroot, port, workers))
        proc = subprocess.Popen(
            [NGINX, "-e", str(log), "-c", str(conf), "-p", str(prefix)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("ab"),
        )
        if _wait_listening(port, proc, time.monotonic() + START_TIMEOUT):
            # Workers fork right after the master binds; give them a moment to exist.
            deadline = time.monotonic() + START_TIMEOUT
            workers_found = _children(proc.pid)
            while len(workers_found) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
                workers_found = _children(proc.pid)
            return Server("nginx", port, proc, log, [proc.pid, *workers_found])
        server = Server("nginx", port, proc, log, [proc.pid])
        server.stop()
        last = server.log_tail()
    raise BenchError(f"nginx did not start: {last}")


def start_ocicache(cache_dir: Path, loop: str, log: Path) -> Server:
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        str(cache_dir),
        # A closed port: the warm path must not need upstream, and would fail loudly if it did.
        "--upstream",
        f"{UPSTREAM}=http://127.0.0.1:1",
        "--log-level",
        "warning",
        "--event-loop",
        loop,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log.open("ab")
    )
    server = Server(f"ocicache-{loop}", 0, proc, log, [proc.pid])
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and b"\n" not in seen:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    found = _LISTENING_RE.search(seen.decode(errors="replace"))
    if found is None:
        server.stop()
        raise BenchError(f"{server.name} did not start: {seen!r} {server.log_tail()}")
    server.port = int(found.group(1))
    return server


# --- the file ------------------------------------------------------------------------------------


def make_blob(path: Path, size: int) -> Digest:
    """Write ``size`` random bytes to ``path``; return their sha256 digest."""
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return Digest("sha256", h.hexdigest())


def _link(src: Path, dst: Path) -> bool:
    """Hard-link (same pages in the page cache for every server); copy if that is impossible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def seed_cache(cache_dir: Path, blob: Path, digest: Digest) -> bool:
    """Put the blob in an ocicache cache, with the record that REPO holds it upstream."""
    storage = Storage(cache_dir)
    storage.prepare()
    linked = _link(blob, storage.blob_path(digest))
    # Without the holder row the proxy would first ask upstream whether REPO holds the blob
    # (proxy/flows/access.py), and the upstream here is a closed port.
    seed(cache_dir, blobs=[(str(digest), blob.stat().st_size)], holders=[(UPSTREAM, REPO, str(digest))])
    return linked


def blob_path(digest: Digest) -> str:
    return f"/v2/{REPO}/blobs/{digest}"


# --- checking the answers once -----------------------------------------------------------------


def verify(server: Server, path: str, blob: Path, digest: Digest, workloads: Sequence[Workload]) -> None:
    """Each workload's answer, once: status, length, and the bytes themselves."""
    for wl in workloads:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
        try:
            headers = {} if wl.range_header is None else {"Range": wl.range_header}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            h = hashlib.sha256()
            got = 0
            while chunk := resp.read(4 * MiB):
                h.update(chunk)
                got += len(chunk)
        finally:
            conn.close()
        if resp.status != wl.status or got != wl.body:
            raise BenchError(
                f"{server.name} {wl.name}: status {resp.status}, {got} bytes; "
                f"expected {wl.status}, {wl.body} bytes"
            )
        with open(blob, "rb") as f:
            want = hashlib.sha256(f.read(wl.body)).hexdigest() if wl.range_header else digest.hex
        if h.hexdigest() != want:
            raise BenchError(f"{server.name} {wl.name}: body differs from the file")


# --- load generators ---------------------------------------------------------------------------


def run_wrk(url: str, wl: Workload, cfg: BenchConfig, script: Path) -> ClientRun:
    cmd = [
        "wrk",
        f"-t{min(cfg.wrk_threads, cfg.connections)}",
        f"-c{cfg.connections}",
        f"-d{max(1, round(cfg.seconds))}s",
        f"--timeout={int(IO_TIMEOUT)}s",
        "-s",
        str(script),
    ]
    if wl.range_header is not None:
        cmd += ["-H", f"Range: {wl.range_header}"]
    cmd.append(url)
    cpu0 = _children_cpu()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=cfg.seconds + CLIENT_GRACE, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {exc}") from exc
    cpu = _children_cpu() - cpu0
    found = _WRK_RE.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    micros, requests, nbytes, *errors = (int(g) for g in found.groups())
    return ClientRun(micros / 1e6, nbytes, requests, sum(errors), cpu)


def run_curl(url: str, wl: Workload, cfg: BenchConfig) -> ClientRun:
    """``--connections`` loops, each running curl on a batch of URLs over one connection."""
    batch = max(1, min(CURL_BATCH_MAX_URLS, CURL_BATCH_BYTES // max(1, wl.body)))
    cmd = ["curl", "--silent", "--max-time", str(int(IO_TIMEOUT))]
    cmd += ["--write-out", "%{http_code} %{size_download}\\n"]
    if wl.range_header is not None:
        cmd += ["--header", f"Range: {wl.range_header}"]
    for _ in range(batch):
        cmd += ["--output", "/dev/null", url]
    lock = threading.Lock()
    totals = {"bytes": 0, "ok": 0, "bad": 0}
    failures: list[str] = []
    start = time.monotonic()
    deadline = start + cfg.seconds

    def loop() -> None:
        for _ in range(MAX_CURL_BATCHES):
            if time.monotonic() >= deadline:
                return
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=IO_TIMEOUT * batch, check=False
                )
            except subprocess.TimeoutExpired:
                with lock:
                    totals["bad"] += 1
                    failures.append("curl timed out")
                return
            nbytes = ok = bad = 0
            for line in done.stdout.splitlines():
                code, _, size = line.partition(" ")
                if not (code.isdigit() and size.isdigit()):
                    continue  # not a write-out line; counted as bad below
                nbytes += int(size)
                if int(code) == wl.status and int(size) == wl.body:
                    ok += 1
                else:
                    bad += 1
            # A transfer that failed before its write-out line still counts as a bad response.
            bad += max(0, batch - ok - bad)
            with lock:
                totals["bytes"] += nbytes
                totals["ok"] += ok
                totals["bad"] += bad
                if done.returncode != 0:
                    failures.append(f"curl exit {done.returncode}: {done.stderr[-300:]}")

    cpu0 = _children_cpu()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(cfg.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg.seconds + CLIENT_GRACE + IO_TIMEOUT * batch)
    # The clock runs until the last transfer ends: curl only reports whole transfers.
    seconds = time.monotonic() - start
    if any(t.is_alive() for t in threads):
        raise BenchError("curl loops did not finish")
    if failures:
        print(f"  curl: {failures[0]} ({len(failures)} failures)", file=sys.stderr)
    return ClientRun(seconds, totals["bytes"], totals["ok"], totals["bad"], _children_cpu() - cpu0)


@dataclass
class _SinkTally:
    bytes: int = 0
    ok: int = 0
    bad: int = 0


def _read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """Status, Content-Length and the body bytes that came with the head."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > HEAD_MAX:
            raise ConnectionError("response head too large")
        chunk = sock.recv(HEAD_MAX)
        if not chunk:
            raise ConnectionError("closed before the response head")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length < 0:
        raise ConnectionError("response without Content-Length")
    return status, length, rest


def _sink_connection(port: int, request: bytes, wl: Workload, deadline: float, tally: _SinkTally) -> None:
    buf = bytearray(SINK_BUFFER)
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        for _ in range(MAX_RESPONSES_PER_CONNECTION):
            if time.monotonic() >= deadline:
                return
            sock.sendall(request)
            status, length, rest = _read_head(sock)
            tally.bytes += len(rest)
            left = length - len(rest)
            while left > 0:
                # Stop mid-body at the deadline: bytes are counted as they arrive, so the
                # throughput needs no whole response at the end.
                if time.monotonic() >= deadline:
                    return
                n = sock.recv_into(view, min(left, SINK_BUFFER))
                if n == 0:
                    raise ConnectionError("closed mid-body")
                tally.bytes += n
                left -= n
            if status == wl.status and length == wl.body:
                tally.ok += 1
            else:
                tally.bad += 1


def run_sink(port: int, path: str, wl: Workload, cfg: BenchConfig) -> ClientRun:
    """``--connections`` threads in this process, each a keep-alive connection read to the end."""
    extra = "" if wl.range_header is None else f"Range: {wl.range_header}\r\n"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    tallies = [_SinkTally() for _ in range(cfg.connections)]
    errors: list[str] = []
    start = time.monotonic()
    deadline = start + cfg.seconds

    def worker(tally: _SinkTally) -> None:
        try:
            _sink_connection(port, request, wl, deadline, tally)
        except (OSError, ValueError, IndexError) as exc:
            tally.bad += 1
            errors.append(repr(exc))

    cpu0 = _self_cpu()
    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in tallies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg.seconds + CLIENT_GRACE)
    seconds = time.monotonic() - start
    if any(t.is_alive() for t in threads):
        raise BenchError("sink connections did not finish")
    if errors:
        print(f"  sink: {errors[0]} ({len(errors)} errors)", file=sys.stderr)
    return ClientRun(
        seconds,
        sum(t.bytes for t in tallies),
        sum(t.ok for t in tallies),
        sum(t.bad for t in tallies),
        _self_cpu() - cpu0,
    )


# --- the run -------------------------------------------------------------------------------------


def workloads_for(cfg: BenchConfig) -> list[Workload]:
    wls = [Workload("full", None, 200, cfg.size)]
    if cfg.range_bytes > 0:
        last = min(cfg.range_bytes, cfg.size) - 1
        wls.append(Workload(f"range 0-{last}", f"bytes=0-{last}", 206, last + 1))
    return wls


def _machine() -> dict[str, str]:
    return {
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False).stderr.strip(),
    }


@contextlib.contextmanager
def _workdir(cfg: BenchConfig) -> Iterator[Path]:
    if cfg.workdir is not None:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        yield cfg.workdir
        return
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as d:
        yield Path(d)


def run(cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> Report:
    if cfg.client == "wrk" and shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (apt-get install wrk), or use --client curl|sink")
    if cfg.client == "curl" and shutil.which("curl") is None:
        raise BenchError("curl is not installed")
    if not Path(NGINX).exists():
        raise BenchError(f"{NGINX} is not installed (apt-get install nginx-light)")
    wls = workloads_for(cfg)
    with _workdir(cfg) as work, contextlib.ExitStack() as stack:
        blob = work / "blob"
        digest = make_blob(blob, cfg.size)
        path = blob_path(digest)
        docroot = work / "docroot"
        shared = _link(blob, docroot / path.lstrip("/"))

        servers: list[Server] = []
        nginx = start_nginx(work / "nginx", docroot, workers=os.cpu_count() or 2)
        stack.callback(nginx.stop)
        servers.append(nginx)
        for loop in cfg.loops:
            cache = work / f"cache-{loop}"
            shared = seed_cache(cache, blob, digest) and shared
            proxy = start_ocicache(cache, loop, work / f"ocicache-{loop}.log")
            stack.callback(proxy.stop)
            servers.append(proxy)
        for server in servers:
            verify(server, path, blob, digest, wls)

        script = work / "bench.lua"
        script.write_text(_WRK_SCRIPT)
        report = Report(cfg, str(digest), [s.name for s in servers], wls, _machine(), shared)
        for rnd in range(1, cfg.rounds + 1):
            for wl in wls:
                for server in servers:
                    if not server.alive():
                        raise BenchError(f"{server.name} exited: {server.log_tail()}")
                    ours = {pid for srv in servers for pid in srv.pids}
                    procs0 = _process_cpu()
                    cpu0 = server.cpu()
                    busy0, steal0 = _machine_cpu()
                    if cfg.client == "wrk":
                        got = run_wrk(server.url(path), wl, cfg, script)
                    elif cfg.client == "curl":
                        got = run_curl(server.url(path), wl, cfg)
                    else:
                        got = run_sink(server.port, path, wl, cfg)
                    busy1, steal1 = _machine_cpu()
                    server_cpu = server.cpu() - cpu0
                    foreign = _foreign_cpu(procs0, _process_cpu(), ours)
                    m = Measurement(
                        server.name, wl.name, rnd, got, server_cpu, busy1 - busy0, steal1 - steal0, foreign
                    )
                    report.measurements.append(m)
                    progress(
                        f"round {rnd} {wl.name:>16} {server.name:<17} {m.gbps:6.2f} GB/s "
                        f"({got.responses} responses, {got.bad} bad, server CPU {m.server_cpu:.1f} s, "
                        f"client CPU {got.cpu:.1f} s, machine busy {m.machine_busy:.1f} s, "
                        f"steal {m.steal:.1f} s, other processes {m.foreign:.1f} s, in {got.seconds:.1f} s)"
                    )
        return report


# --- output --------------------------------------------------------------------------------------


def render(report: Report) -> str:
    cfg = report.config
    m = report.machine
    lines = [
        "# ocicache warm path: cached blob throughput next to nginx",
        "",
        f"- file: {cfg.size / MiB:g} MiB of random bytes (`{report.digest[:19]}…`), "
        + ("one inode hard-linked into every server's tree" if report.shared_inode else "copied per server"),
        f"- client: `{cfg.client}`"
        + (f" ({cfg.wrk_threads} threads)" if cfg.client == "wrk" else "")
        + f", {cfg.connections} keep-alive connections, {cfg.seconds:g} s per measurement, "
        f"{cfg.rounds} interleaved rounds",
        f"- **client and servers share this machine's {m['cpus']} cores**: a client that costs CPU "
        "takes it from the server; the CPU columns show who used what",
        f"- nginx: {m['nginx'].removeprefix('nginx version: ')}, {m['cpus']} workers, sendfile on; "
        f"ocicache: `python -m proxy serve --event-loop …`; Python {m['python']}, Linux {m['kernel']}",
        "- GB = 10^9 bytes; GB/s = bytes received / seconds"
        + (" (wrk counts response heads too)" if cfg.client == "wrk" else "")
        + "; CPU in cores = CPU seconds / wall seconds; machine busy = all cores, kernel softirq "
        "(loopback TCP) included, which the per-process columns may miss",
        "",
        "| workload | server | GB/s per round | mean GB/s | vs nginx (median of rounds) | server CPU (cores) "
        "| client CPU (cores) | machine busy (cores) | other processes (cores) | GB per server CPU-s "
        "| responses | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for wl in report.workloads:
        for server in report.servers:
            ms = report.of(server, wl.name)
            if not ms:
                continue
            secs = sum(x.run.seconds for x in ms)
            scpu = sum(x.server_cpu for x in ms)
            ccpu = sum(x.run.cpu for x in ms)
            busy = sum(x.machine_busy for x in ms)
            foreign = sum(x.foreign for x in ms)
            nbytes = sum(x.run.bytes for x in ms)
            mean = report.mean_gbps(server, wl.name)
            r = report.ratio(server, wl.name)
            ratio = "n/a" if r is None else f"{r:.2f}"
            per_cpu = f"{nbytes / GB / scpu:.2f}" if scpu > 0 else "n/a"
            lines.append(
                f"| {wl.name} | {server} | {' / '.join(f'{x.gbps:.2f}' for x in ms)} | {mean:.2f} "
                f"| {ratio} | {scpu / secs:.2f} | {ccpu / secs:.2f} | {busy / secs:.2f} "
                f"| {foreign / secs:.2f} | {per_cpu} "
                f"| {sum(x.run.responses for x in ms)} | {sum(x.run.bad for x in ms)} |"
            )
    noisy = [x for x in report.measurements if x.run.seconds > 0 and x.foreign / x.run.seconds > NOISY]
    if noisy:
        lines += [
            "",
            f"**Warning:** other processes used more than {NOISY:g} cores during {len(noisy)} of "
            f"{len(report.measurements)} measurements (up to "
            f"{max(x.foreign / x.run.seconds for x in noisy):.2f} cores): those numbers are skewed.",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> tuple[BenchConfig, Path | None]:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_warm", description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=float, default=100.0, help="blob size (default 100)")
    p.add_argument("--connections", type=int, default=8, help="keep-alive connections (default 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved passes over all servers (default 2)")
    p.add_argument("--client", choices=("wrk", "curl", "sink"), default="wrk", help="load generator")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--range-mib", type=float, default=1.0, help="Range workload: bytes=0-(this-1); 0 skips (default 1)"
    )
    p.add_argument("--loops", default="uvloop,asyncio", help="ocicache event loops to measure")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    ns = p.parse_args(argv)
    if ns.size_mib <= 0 or ns.connections < 1 or ns.seconds <= 0 or ns.rounds < 1 or ns.wrk_threads < 1:
        p.error("sizes, counts and times must be positive")
    loops = tuple(x for x in ns.loops.split(",") if x)
    if any(x not in ("uvloop", "asyncio") for x in loops):
        p.error("--loops takes uvloop and/or asyncio")
    cfg = BenchConfig(
        size=int(ns.size_mib * MiB),
        connections=ns.connections,
        seconds=ns.seconds,
        rounds=ns.rounds,
        client=ns.client,
        wrk_threads=ns.wrk_threads,
        range_bytes=int(ns.range_mib * MiB),
        loops=loops,
        workdir=ns.workdir,
    )
    return cfg, ns.out


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out = parse_args(argv)
    try:
        report = run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except BenchError as exc:
        print(f"bench_warm: {exc}", file=sys.stderr)
        return 1
    text = render(report)
    sys.stdout.write(text)
    if out is not None:
        out.write_text(text)
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
