"""The kill -9 soak (issue 13): clients pull and verify every byte while the proxy is killed.

```sh
python -m loadtests.soak [--seconds 180] [--clients 50] [--restart-every 30] [--out FILE]
```

On loopback only. A real upstream, Debian's ``docker-registry`` (CNCF distribution, as
``tests/support/registry.py`` starts it), holds a mix of images: an index of two platform
images and single images, layers from a few hundred bytes to 8 MiB. ocicache runs as its own
process (``python -m proxy serve``) in front of it, and is killed with SIGKILL and started
again on the same port and cache every ``--restart-every`` seconds. Meanwhile ``--clients``
clients pull in a loop: manifests by tag and by digest, whole blobs, single ranges and suffix
ranges, each body hashed or compared byte for byte against what was pushed. A request cut by
the kill is counted as interrupted and retried; that is what a client sees of a crash.

It reports, and exits 1 unless each holds:

* bodies accepted as complete that were wrong: 0 (a body is accepted when its answer ended
  cleanly: a 200 or 206 whose every promised byte arrived);
* 5xx answers outside restart windows: 0 (a window runs from the kill to 2 s after the new
  process is listening);
* temp files left: 0 (none from before a kill survives the restart, none at the end);
* RSS over time: sampled every 2 s; flat when no run's peak is 1.5x the first run's;
* catalogue and disk agree: after the graceful stop at the end, ``index.db``'s blob rows
  are exactly the files in ``blobs/`` at their sizes, and every file hashes to its name.

Self-contained: it imports nothing from the other load tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

import aiohttp

from tests.support.images import MANIFEST_ACCEPT, Image, make_image, make_index, push_image, push_manifest
from tests.support.registry import Registry, start_registry

ROOT: Final = Path(__file__).resolve().parent.parent
MiB: Final = 1024 * 1024
START_TIMEOUT: Final = 60.0
WINDOW_GRACE: Final = 2.0
RSS_EVERY: Final = 2.0
CLIENT_TIMEOUT: Final = aiohttp.ClientTimeout(total=120, sock_connect=10)
# Repositories and their images: (repository, tag, layer sizes, seed).
IMAGES: Final = [
    ("library/tiny", "v1", (300,), 1),
    ("library/small", "v1", (20_000, 60_000), 2),
    ("library/mid", "v1", (500_000, 1_500_000), 3),
    ("library/big", "v1", (8 * MiB, 3 * MiB), 4),
    ("team/app", "v1", (100_000, 2 * MiB, 700_000), 5),
    ("team/tool", "v2", (4 * MiB,), 6),
]


@dataclass(frozen=True)
class Config:
    seconds: float = 180.0
    clients: int = 50
    restart_every: float = 30.0
    workdir: Path | None = None
    seed: int = 13


@dataclass
class Content:
    """What upstream holds, to check every body against."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> body
    tags: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, tag) -> digest
    repo_blobs: dict[str, list[str]] = field(default_factory=dict)
    repo_manifests: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Report:
    seconds: float = 0.0
    clients: int = 0
    restarts: int = 0
    answered: dict[str, int] = field(default_factory=dict)  # status -> count
    verified_bytes: int = 0
    interrupted: int = 0
    wrong_bodies: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    five_xx_outside: int = 0
    five_xx_inside: int = 0
    five_xx_examples: list[str] = field(default_factory=list)
    temp_left_after_restarts: int = 0
    temp_left_at_end: int = 0
    rss_mib: list[tuple[float, int, float]] = field(default_factory=list)  # (t, run, MiB)
    catalogue_rows: int = 0
    files: int = 0
    catalogue_agrees: bool = False
    disagreement: str = ""

    def run_peaks(self) -> list[float]:
        peaks: dict[int, float] = {}
        for _, run, mib in self.rss_mib:
            peaks[run] = max(peaks.get(run, 0.0), mib)
        return [peaks[r] for r in sorted(peaks)]

    @property
    def rss_flat(self) -> bool:
        peaks = self.run_peaks()
        return bool(peaks) and max(peaks) < 1.5 * peaks[0]

    @property
    def ok(self) -> bool:
        return (
            self.wrong_bodies == 0
            and self.five_xx_outside == 0
            and self.temp_left_after_restarts == 0
            and self.temp_left_at_end == 0
            and self.rss_flat
            and self.catalogue_agrees
            and sum(self.answered.values()) > 0
        )

    def text(self) -> str:
        answered = sum(self.answered.values())
        by_status = ", ".join(f"{k}: {v}" for k, v in sorted(self.answered.items()))
        peaks = " ".join(f"{p:.1f}" for p in self.run_peaks())
        lines = [
            f"soak: {self.seconds:.0f} s, {self.clients} clients, {self.restarts} restarts (SIGKILL)",
            f"requests answered: {answered} ({by_status}); {self.verified_bytes / MiB:.0f} MiB verified;"
            f" {self.interrupted} interrupted by the kills",
            f"bodies accepted as complete that were wrong: {self.wrong_bodies}",
            f"5xx answers outside restart windows: {self.five_xx_outside} (inside: {self.five_xx_inside})",
            f"temp files left: {self.temp_left_after_restarts} after restarts,"
            f" {self.temp_left_at_end} at the end",
            f"RSS peak per run (MiB): {peaks}; flat: {'yes' if self.rss_flat else 'no'}",
            f"catalogue and disk agree: {'yes' if self.catalogue_agrees else 'no'}"
            f" ({self.catalogue_rows} rows, {self.files} files)"
            + (f": {self.disagreement}" if self.disagreement else ""),
        ]
        lines += [f"  wrong: {w}" for w in self.wrong_examples[:5]]
        lines += [f"  5xx: {w}" for w in self.five_xx_examples[:5]]
        lines.append("result: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


# --- the proxy process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ProxyProcess:
    """``python -m proxy serve`` on a fixed loopback port and cache, started again at will."""

    def __init__(self, cache: Path, port: int, upstream: str, log: Path) -> None:
        self.cache, self.port, self.upstream, self.log = cache, port, upstream, log
        self.proc: asyncio.subprocess.Process | None = None
        self.run = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve",
                "--listen", f"127.0.0.1:{self.port}", "--cache-dir", str(self.cache),
                "--upstream", f"docker.io={self.upstream}", "--log-level", "warning",
                stdout=asyncio.subprocess.PIPE, stderr=log, cwd=ROOT, env=env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        # It prints where it listens once the socket is bound (after the catalogue is read).
        line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        if b"listening on" not in line:
            raise RuntimeError(f"proxy did not start: {line!r}; see {self.log}")
        self.run += 1

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            await self.kill()

    def rss_mib(self) -> float | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else None


# --- content ---------------------------------------------------------------------------------------


async def push_content(registry: Registry) -> Content:
    content = Content()
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
        for repo, tag, sizes, seed in IMAGES:
            image = make_image(layer_sizes=sizes, seed=seed)
            await push_image(session, registry.url, repo, image, tag)
            _record(content, repo, tag, image)
        # An index of two platform images, as multi-arch images are.
        images = [
            make_image(layer_sizes=(30_000, 900_000), arch=a, seed=40 + i)
            for i, a in enumerate(("amd64", "arm64"))
        ]
        for image in images:
            await push_image(session, registry.url, "library/multi", image)
            _record(content, "library/multi", None, image)
        index = make_index(images)
        await push_manifest(session, registry.url, "library/multi", "v1", index.manifest, index.media_type)
        content.manifests[index.digest] = index.manifest
        content.tags[("library/multi", "v1")] = index.digest
        content.repo_manifests["library/multi"].append(index.digest)
    return content


def _record(content: Content, repo: str, tag: str | None, image: Image) -> None:
    content.manifests[image.manifest_digest] = image.manifest
    if tag is not None:
        content.tags[(repo, tag)] = image.manifest_digest
    content.repo_manifests.setdefault(repo, []).append(image.manifest_digest)
    for blob in image.blobs:
        content.blobs[blob.digest] = blob.data
        content.repo_blobs.setdefault(repo, []).append(blob.digest)


# --- clients ------------------------------------------------------------------------------------------


class Windows:
    """The restart windows: from each kill until WINDOW_GRACE after the restart listens."""

    def __init__(self) -> None:
        self.spans: list[list[float]] = []

    def open(self) -> None:
        self.spans.append([time.monotonic(), float("inf")])

    def close(self) -> None:
        self.spans[-1][1] = time.monotonic() + WINDOW_GRACE

    def covers(self, start: float, end: float) -> bool:
        return any(a <= end and start <= b for a, b in self.spans)


async def client(
    n: int,
    proxy: ProxyProcess,
    content: Content,
    report: Report,
    windows: Windows,
    deadline: float,
    seed: int,
) -> None:
    rng = random.Random(seed * 1000 + n)
    repos = sorted(content.repo_blobs)
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, auto_decompress=False) as session:
        while time.monotonic() < deadline:
            repo = rng.choice(repos)
            roll = rng.random()
            headers: dict[str, str] = {}
            expected_range: tuple[int, int] | None = None
            if roll < 0.2:
                tag = next(t for (r, t) in content.tags if r == repo)
                digest = content.tags[(repo, tag)]
                path, data, headers = (
                    f"/v2/{repo}/manifests/{tag}",
                    content.manifests[digest],
                    {"Accept": MANIFEST_ACCEPT},
                )
            elif roll < 0.35:
                digest = rng.choice(content.repo_manifests[repo])
                path, data, headers = (
                    f"/v2/{repo}/manifests/{digest}",
                    content.manifests[digest],
                    {"Accept": MANIFEST_ACCEPT},
                )
            else:
                digest = rng.choice(content.repo_blobs[repo])
                path, data = f"/v2/{repo}/blobs/{digest}", content.blobs[digest]
                if roll > 0.85 and len(data) > 1:
                    first = rng.randrange(len(data))
                    last = min(len(data) - 1, first + rng.randrange(1, 256 * 1024))
                    if rng.random() < 0.3:
                        headers["Range"] = f"bytes=-{len(data) - first}"
                        expected_range = (first, len(data) - 1)
                    else:
                        headers["Range"] = f"bytes={first}-{last}"
                        expected_range = (first, last)
            started = time.monotonic()
            try:
                await fetch(
                    session, proxy.url + path, headers, data, expected_range, digest, report, windows, started
                )
            except (aiohttp.ClientError, TimeoutError, ConnectionError):
                report.interrupted += 1
                # The proxy is down or restarting: try again soon, as a client would.
                await asyncio.sleep(0.2)


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    data: bytes,
    expected_range: tuple[int, int] | None,
    digest: str,
    report: Report,
    windows: Windows,
    started: float,
) -> None:
    async with session.get(url, headers=headers) as resp:
        status = resp.status
        if status >= 500:
            body = await resp.read()
            where = f"{status} {url.partition('/v2/')[2][:90]}: {body[:160]!r}"
            if windows.covers(started, time.monotonic()):
                report.five_xx_inside += 1
            else:
                report.five_xx_outside += 1
                report.five_xx_examples.append(where)
            report.answered[str(status)] = report.answered.get(str(status), 0) + 1
            return
        hasher = hashlib.sha256()
        received = bytearray() if expected_range is not None else None
        size = 0
        # aiohttp raises ClientPayloadError for a body cut short of its Content-Length: only a
        # body that ended cleanly gets past this loop, and that is what a client accepts.
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            hasher.update(chunk)
            if received is not None:
                received += chunk
        report.answered[str(status)] = report.answered.get(str(status), 0) + 1
    wrong = ""
    if expected_range is not None:
        want = data[expected_range[0] : expected_range[1] + 1]
        if status != 206 or bytes(received or b"") != want:
            wrong = f"range {headers.get('Range')} of {digest[:19]}: {status}, {size} bytes"
    elif status != 200:
        wrong = f"{status} for {url.partition('/v2/')[2][:90]}"
    elif size != len(data) or "sha256:" + hasher.hexdigest() != digest:
        wrong = f"{digest[:19]}: {size} of {len(data)} bytes, sha256 {hasher.hexdigest()[:12]}"
    if wrong:
        report.wrong_bodies += 1
        report.wrong_examples.append(wrong)
    else:
        report.verified_bytes += size


# --- the run --------------------------------------------------------------------------------------------


def temp_files(cache: Path, older_than: float | None = None) -> int:
    tmp = cache / "tmp"
    if not tmp.is_dir():
        return 0
    count = 0
    for entry in tmp.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if older_than is None or entry.stat().st_mtime < older_than:
                count += 1
    return count


def compare_catalogue(cache: Path, report: Report) -> None:
    conn = sqlite3.connect(f"file:{cache / 'index.db'}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute("SELECT digest, size FROM blobs"))
    finally:
        conn.close()
    files = {}
    for alg in (cache / "blobs").iterdir():
        for path in alg.iterdir():
            data = path.read_bytes()
            if hashlib.new(alg.name, data).hexdigest() != path.name:
                report.disagreement = f"{alg.name}:{path.name} does not hash to its name"
            files[f"{alg.name}:{path.name}"] = len(data)
    report.catalogue_rows, report.files = len(rows), len(files)
    if rows != files and not report.disagreement:
        only_rows = sorted(set(rows) - set(files))[:3]
        only_files = sorted(set(files) - set(rows))[:3]
        sizes = sorted(d for d in set(rows) & set(files) if rows[d] != files[d])[:3]
        report.disagreement = f"rows only: {only_rows}, files only: {only_files}, sizes differ: {sizes}"
    report.catalogue_agrees = not report.disagreement


async def run_soak(config: Config) -> Report:
    with contextlib.ExitStack() as stack:
        workdir = config.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        registry = await asyncio.to_thread(start_registry, workdir / "registry")
        stack.callback(registry.stop)
        content = await push_content(registry)
        proxy = ProxyProcess(workdir / "cache", free_port(), registry.url, workdir / "proxy.log")
        report = Report(clients=config.clients)
        windows = Windows()
        await proxy.start()
        began = time.monotonic()
        deadline = began + config.seconds
        stop = asyncio.Event()

        async def killer() -> None:
            while time.monotonic() + config.restart_every < deadline:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), config.restart_every)
                    return
                windows.open()
                killed_at = time.time()
                await proxy.kill()
                await proxy.start()
                windows.close()
                report.restarts += 1
                # The new process swept tmp/ before listening: nothing from before the kill.
                report.temp_left_after_restarts += temp_files(proxy.cache, older_than=killed_at)

        async def sampler() -> None:
            while not stop.is_set():
                mib = proxy.rss_mib()
                if mib is not None:
                    report.rss_mib.append((round(time.monotonic() - began, 1), proxy.run, round(mib, 1)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RSS_EVERY)

        background = [asyncio.create_task(killer()), asyncio.create_task(sampler())]
        try:
            await asyncio.gather(
                *(
                    client(n, proxy, content, report, windows, deadline, config.seed)
                    for n in range(config.clients)
                )
            )
        finally:
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            await proxy.stop()
        report.seconds = time.monotonic() - began
        report.temp_left_at_end = temp_files(proxy.cache)
        compare_catalogue(proxy.cache, report)
        return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds", type=float, default=Config.seconds, help="how long clients pull (default 180)"
    )
    p.add_argument("--clients", type=int, default=Config.clients, help="concurrent clients (default 50)")
    p.add_argument(
        "--restart-every", type=float, default=Config.restart_every, help="seconds between kills (30)"
    )
    p.add_argument(
        "--workdir", type=Path, help="keep the registry, cache and logs here (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, help="also write the report as JSON here")
    ns = p.parse_args(argv)
    if not 0 < ns.seconds <= 3600 or not 0 < ns.clients <= 500:
        p.error("--seconds must be in (0, 3600] and --clients in (0, 500]")
    report = asyncio.run(run_soak(Config(ns.seconds, ns.clients, ns.restart_every, ns.workdir)))
    print(report.text())
    if ns.out is not None:
        doc = asdict(report) | {
            "rss_flat": report.rss_flat,
            "ok": report.ok,
            "run_peaks_mib": report.run_peaks(),
        }
        ns.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
