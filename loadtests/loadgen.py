"""Load generators for throughput and latency: wrk, and the lighter sink (:mod:`loadtests.sink`).

Both run as child processes, started on the client's CPUs of the placement, so that their CPU is
their own (measured from the kernel's accounting once they are waited for) and they can be
pinned. Each returns a :class:`LoadResult` that names the client as it ran, for the report.
Before any timing, :func:`check_once` fetches each answer once and compares its bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from loadtests.placement import Placement
from loadtests.sampling import children_cpu
from loadtests.servers import ROOT

GB: Final = 1e9
MiB: Final = 1024 * 1024
IO_TIMEOUT: Final = 30.0
# Time a client may take beyond its duration (process start-up, the last response).
CLIENT_GRACE: Final = 60.0

_WRK_RE: Final = re.compile(
    r"^BENCH (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", re.MULTILINE
)
# wrk prints its own summary with rounded units; this prints the exact counters instead.
# errors.status counts answers >= 400; connect/read/write/timeout count broken connections.
# Latency percentiles are in microseconds.
WRK_SCRIPT: Final = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %d %d %d\\n",
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50.0), latency:percentile(99.0)))
end
"""


class LoadError(RuntimeError):
    """A client could not run, or a server's answer was wrong."""


@dataclass(frozen=True)
class Request:
    """What every request of a run asks for, and what every answer must be."""

    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    status: int = 200
    body: int = 0  # the body's length

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


@dataclass(frozen=True)
class LoadResult:
    client: str  # the client as it ran, e.g. "wrk -t2 -c8"
    seconds: float
    bytes: int  # bytes received; wrk counts response heads too, the sink bodies only
    responses: int
    bad: int  # wrong status or length, broken connections
    cpu: float  # the client's CPU seconds
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / GB if self.seconds > 0 else 0.0

    @property
    def rps(self) -> float:
        return self.responses / self.seconds if self.seconds > 0 else 0.0


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False, timeout=30)
    first = (done.stdout + done.stderr).strip().splitlines()
    return first[0].split()[1] if first and len(first[0].split()) > 1 else "?"


def run_wrk(
    req: Request, *, connections: int, threads: int, seconds: float, placement: Placement, script_dir: Path
) -> LoadResult:
    if shutil.which("wrk") is None:
        raise LoadError("wrk is not installed (apt-get install wrk)")
    script = script_dir / "bench.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    threads = min(threads, connections)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={int(IO_TIMEOUT)}s",
        "-s",
        str(script),
    ]
    for name, value in req.headers:
        argv += ["-H", f"{name}: {value}"]
    argv.append(req.url)
    cpu0 = children_cpu()
    try:
        done = subprocess.run(
            placement.client_argv(argv),
            capture_output=True,
            text=True,
            timeout=seconds + CLIENT_GRACE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"wrk did not finish: {exc}") from exc
    cpu = children_cpu() - cpu0
    found = _WRK_RE.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")
    micros, requests, nbytes, *errors, p50, p99 = (int(g) for g in found.groups())
    return LoadResult(
        f"wrk -t{threads} -c{connections}",
        micros / 1e6,
        nbytes,
        requests,
        sum(errors),
        cpu,
        p50 / 1000,
        p99 / 1000,
    )


def run_sink(req: Request, *, connections: int, seconds: float, placement: Placement) -> LoadResult:
    argv = [
        sys.executable,
        "-m",
        "loadtests.sink",
        "--port",
        str(req.port),
        "--path",
        req.path,
        "--status",
        str(req.status),
        "--body",
        str(req.body),
        "--connections",
        str(connections),
        "--seconds",
        repr(seconds),
    ]
    for name, value in req.headers:
        argv += ["--header", f"{name}: {value}"]
    cpu0 = children_cpu()
    try:
        done = subprocess.run(
            placement.client_argv(argv),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=seconds + CLIENT_GRACE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"the sink did not finish: {exc}") from exc
    cpu = children_cpu() - cpu0
    try:
        got = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as exc:
        raise LoadError(f"the sink failed ({done.returncode}): {done.stderr[-1000:]}") from exc
    if got["errors"]:
        print(f"  sink: {got['errors'][0]} ({len(got['errors'])} errors)", file=sys.stderr)
    return LoadResult(
        f"sink -c{connections}",
        float(got["seconds"]),
        int(got["bytes"]),
        int(got["ok"]),
        int(got["bad"]),
        cpu,
    )


def check_once(req: Request, want: bytes | str) -> None:
    """One request; its status, length and bytes (or sha256 digest, ``sha256:…``) must match."""
    conn = http.client.HTTPConnection("127.0.0.1", req.port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", req.path, headers=dict(req.headers))
        resp = conn.getresponse()
        h = hashlib.sha256()
        got = 0
        while chunk := resp.read(4 * MiB):
            h.update(chunk)
            got += len(chunk)
    finally:
        conn.close()
    if resp.status != req.status or got != req.body:
        raise LoadError(f"{req.url}: status {resp.status}, {got} bytes; expected {req.status}, {req.body}")
    digest = want if isinstance(want, str) else "sha256:" + hashlib.sha256(want).hexdigest()
    if "sha256:" + h.hexdigest() != digest:
        raise LoadError(f"{req.url}: the body differs from what was stored")


def header_pairs(headers: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``Name: value`` strings as pairs."""
    pairs = []
    for h in headers:
        name, _, value = h.partition(":")
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)
