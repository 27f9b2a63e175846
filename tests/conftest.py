"""Shared fixtures: a real docker-registry, the in-process fake upstream, and ocicache itself
served in-process on a loopback port (so real clients, run as subprocesses, can reach it)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from hypothesis import HealthCheck, settings

from proxy.cli.logs import configure
from proxy.core.config import Settings, UpstreamConfig
from proxy.web import keys
from proxy.web.app import create_app
from proxy.web.jobs import Prefetcher
from proxy.web.runner import AppRunner
from tests.support.fake_upstream import FakeUpstream
from tests.support.redisserver import RedisServer
from tests.support.registry import Registry, running_registry

configure("warning", "console")

# Property tests: a bounded number of examples each, so the suite stays quick; no deadline,
# since a per-example time limit is a timing assertion on a shared machine.
settings.register_profile(
    "ocicache", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ocicache")


class ProxyTestServer(TestServer):
    """aiohttp's test server with ocicache's own runner (see proxy/web/runner.py)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return AppRunner(self.app, **kwargs)


@dataclass
class Proxy:
    server: TestServer
    settings: Settings

    @property
    def url(self) -> str:
        return f"{self.server.scheme}://127.0.0.1:{self.server.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def app(self) -> web.Application:
        return self.server.app

    async def cached(self) -> set[str]:
        """Digests the cache holds once the downloads under way have ended (a client gets
        the verified final byte before the file is fsynced and renamed into the cache)."""
        await self.app[keys.FILLS].settled()
        await self.app[keys.CACHE].settled()  # and the eviction a commit may have started
        storage = self.app[keys.STORAGE]
        return {b.digest for b in storage.scan()}

    def temp_files(self) -> list[Path]:
        return list(self.app[keys.STORAGE].tmp.iterdir())


StartProxy = Callable[..., Awaitable[Proxy]]


def make_settings(cache_dir: Path, upstreams: dict[str, str], **overrides: Any) -> Settings:
    ups = tuple(UpstreamConfig(name, url) for name, url in upstreams.items())
    # One process unless a test says otherwise: an in-process app is one (serve's workers are
    # tests/workers' and tests/system's), whatever this machine's CPU count makes of auto.
    overrides = {"workers": 1, **overrides}
    return replace(Settings(), cache_dir=cache_dir, upstreams=ups, listen_host="127.0.0.1", **overrides)


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    servers: list[TestServer] = []

    async def start(
        upstreams: dict[str, str] | None = None,
        *,
        settings: Settings | None = None,
        cache_dir: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        prefetch: Prefetcher | None = None,
        **overrides: Any,
    ) -> Proxy:
        if settings is None:
            assert upstreams is not None
            settings = make_settings(cache_dir or tmp_path / "cache", upstreams, **overrides)
        server = ProxyTestServer(create_app(settings, prefetch=prefetch), host="127.0.0.1", port=0)
        await server.start_server(ssl=ssl_context)
        servers.append(server)
        cluster = server.app.get(keys.CLUSTER)
        if cluster is not None and settings.cluster.advertise is None:
            cluster.advertise(f"{server.scheme}://127.0.0.1:{server.port}")  # as serve does
        return Proxy(server, settings)

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
def info_logs() -> Iterator[None]:
    """Info-level events reach structlog's processors (and capture_logs) for this test."""
    configure("info", "console")
    try:
        yield
    finally:
        configure("warning", "console")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on a loopback port of its own, for replicas to share."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False) as s:
        yield s


async def raw_request(
    port: int, request_line: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Send one request byte for byte (clients normalise paths like /v2/../..; we must not)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [request_line, "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body
