"""What the cold-blob scenarios share: one random blob in a logged upstream registry, the links
that stand between it and the proxies, a fresh proxy per run, and what the upstream sent.

The blob is a file of random bytes (its exact size, no tar framing), pushed once, streamed from
the file (the 1 GiB of the memory scenario never sits in this process), to Debian's
``docker-registry`` with its request log on: the proxies ask for it by digest, and the
upstream's own log says how many bytes it sent for it (:func:`loadtests.fanout.upstream_traffic`).
Each run gets a fresh proxy with an empty cache, removed afterwards (a 1 GiB cache per run would
pile up). ocicache runs with its defaults plus whatever settings the scenario compares, given
as a ``--config`` file (:func:`config_args`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import aiohttp
import yaml

from loadtests import fanout
from loadtests.fanout import BlobRef, LogMark, RunningProxy, UpstreamTraffic, log_mark
from loadtests.fixtures import REPO, blob_path, link_or_copy, make_blob_file
from loadtests.harness import Context
from loadtests.sampling import Meter, children_cpu
from loadtests.servers import registry_version
from loadtests.shaper import LOOPBACK, MB, ShaperProcess
from tests.support.registry import Registry, start_registry

# How long a proxy's log may take to show a request it has answered.
LOG_TIMEOUT: Final = 30.0


@dataclass(frozen=True)
class ColdBlob:
    file: Path
    digest: str
    size: int
    registry: Registry

    @property
    def ref(self) -> BlobRef:
        return BlobRef(self.digest, self.size)

    @property
    def path(self) -> str:
        return blob_path(self.digest)

    def read(self, offset: int, length: int) -> bytes:
        """The blob's bytes at ``offset`` (what a correct answer to a range holds)."""
        with self.file.open("rb") as f:
            return os.pread(f.fileno(), length, offset)


async def blob_file(ctx: Context, size: int) -> tuple[Path, str]:
    """A file of ``size`` random bytes and its digest, made once per harness run and shared by
    the scenarios that ask for that size (each still puts it in a fresh upstream and fresh
    proxies: only the bytes are the same). Random bytes come at about 100 MB/s here."""
    path = ctx.work / "cold-blobs" / f"{size}.bin"
    recorded = path.with_suffix(".digest")
    if recorded.exists():
        return path, recorded.read_text()
    ctx.say(f"  writing a {size / 2**20:g} MiB blob of random bytes")
    digest = await asyncio.to_thread(make_blob_file, path, size)
    recorded.write_text(digest)
    return path, digest


def seed_registry(storage: Path, repo: str, file: Path, digest: str) -> None:
    """Put a blob where distribution's filesystem driver keeps it, and link it into ``repo``:
    the registry then serves it as if it had been pushed. A hard link to ``file``, so that a
    1 GiB blob costs neither a copy on disk nor the seconds of pushing it through HTTP."""
    algo, _, hexa = digest.partition(":")
    v2 = storage / "docker" / "registry" / "v2"
    link_or_copy(file, v2 / "blobs" / algo / hexa[:2] / hexa / "data")
    layer = v2 / "repositories" / repo / "_layers" / algo / hexa / "link"
    layer.parent.mkdir(parents=True, exist_ok=True)
    layer.write_text(digest)


@contextlib.asynccontextmanager
async def cold_blob(ctx: Context, size: int) -> AsyncIterator[ColdBlob]:
    """A fresh upstream registry holding ``size`` random bytes (stopped on the way out)."""
    file, digest = await blob_file(ctx, size)
    upstream = ctx.dir("upstream")
    await asyncio.to_thread(seed_registry, upstream / "storage", REPO, file, digest)
    registry = await asyncio.to_thread(start_registry, upstream)
    try:
        async with aiohttp.ClientSession() as session, session.head(registry.url + blob_path(digest)) as resp:
            if resp.status != 200 or resp.content_length != size:
                raise RuntimeError(f"the upstream does not serve the seeded blob: {resp.status}")
        ctx.report.servers[f"upstream registry ({ctx.scenario})"] = (
            f"docker-registry {registry_version()}, info log (its record of the bytes it sent), "
            "the blob put in its storage directly"
        )
        yield ColdBlob(file, digest, size, registry)
    finally:
        await asyncio.to_thread(registry.stop)


def config_args(workdir: Path, settings: Mapping[str, Any]) -> tuple[str, ...]:
    """ocicache flags that add ``settings`` to its defaults, as a ``--config`` file."""
    if not settings:
        return ()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ocicache.yaml"
    path.write_text(yaml.safe_dump(dict(settings)))
    return ("--config", str(path))


def describe_link(rate: float, per_connection: bool) -> str:
    each = "each connection on its own" if per_connection else "one bucket shared by every connection"
    return f"{rate / MB:g} MB/s each way, {each} (loadtests/shaper.py, in its own process)"


@contextlib.asynccontextmanager
async def link(blob: ColdBlob, rate: float, *, per_connection: bool = False) -> AsyncIterator[ShaperProcess]:
    async with ShaperProcess((LOOPBACK, blob.registry.port), rate, per_connection=per_connection) as relay:
        yield relay


@contextlib.asynccontextmanager
async def fresh_proxy(
    kind: fanout.ProxyKind, workdir: Path, upstream: str, extra: Sequence[str] = ()
) -> AsyncIterator[RunningProxy]:
    """A proxy with an empty cache in ``workdir``, removed afterwards."""
    # Write back what earlier runs left dirty, so that it does not land in this run's fsync.
    await asyncio.to_thread(os.sync)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    try:
        if kind == "ocicache":
            async with fanout.ocicache_proxy(workdir, upstream, "uvloop", extra) as proxy:
                yield proxy
        else:
            async with fanout.distribution_proxy(workdir, upstream) as proxy:
                yield proxy
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


def mark(blob: ColdBlob) -> LogMark:
    return log_mark(blob.registry)


async def upstream_sent(
    blob: ColdBlob, since: LogMark, proxy: RunningProxy, session: aiohttp.ClientSession
) -> UpstreamTraffic:
    """What the upstream sent for the blob since ``since``, once the proxy has finished its
    fill (ocicache's commit, distribution's store) and the upstream's log has caught up."""
    min_gets = await proxy.settle(session)
    return await fanout.upstream_traffic(blob.registry, since, blob.digest, min_gets, session)


def requests_in(lines: Sequence[str], path: str) -> list[dict[str, Any]]:
    """ocicache's JSON request log lines for ``path``, in order."""
    found = []
    for line in lines:
        if '"request"' not in line or path not in line:
            continue
        with contextlib.suppress(ValueError):
            fields = json.loads(line)
            if isinstance(fields, dict) and fields.get("event") == "request" and fields.get("path") == path:
                found.append(fields)
    return found


async def wait_served(proxy: RunningProxy, path: str, count: int) -> list[dict[str, Any]]:
    """ocicache's request log lines for ``path`` once there are ``count`` (it logs a request
    when its handler returns, which may be just after the client had the last byte)."""
    server = proxy.server
    if server is None:
        return []
    await asyncio.to_thread(
        server.logged.wait_for, lambda lines: len(requests_in(lines, path)) >= count, LOG_TIMEOUT
    )
    return requests_in(server.logged.lines(), path)


class Load:
    """The cores each side used over one measured window: the ``pids`` (proxy, upstream, relay)
    as the server's, the client's (this process, where the readers run, or with ``child`` the
    children it has waited for) as the client's, and everything outside the harness as others'
    (:class:`loadtests.sampling.Meter`)."""

    def __init__(self, pids: Sequence[int], *, child: bool = False) -> None:
        self._meter = Meter(list(pids))
        self._client: Callable[[], float] = children_cpu if child else time.process_time
        self._cpu0 = 0.0

    def __enter__(self) -> Self:
        self._meter.__enter__()
        self._cpu0 = self._client()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def cores(self) -> dict[str, float]:
        return self._meter.usage(self._client() - self._cpu0).as_cores()


def relayed_bytes(lines: Sequence[Mapping[str, Any]]) -> int:
    """Bytes ocicache sent from ranged upstream requests of their own (lazy relays)."""
    return sum(int(f.get("bytes", 0)) for f in lines if f.get("cache") == "lazy")
