"""Upstream failures, as an operator reads them: one warning per failed exchange naming the
upstream, its host, the operation and the cause (errno, TLS reason, status and OCI code),
counted by cause in /metrics, and kept as the upstream's last failure. The client still sees
only the OCI envelope, with no secret. Every upstream here is on loopback."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey

from proxy.upstream import failures
from proxy.upstream.failures import cause_of, oci_code, status_cause
from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.certs import make_pki
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image

SECRET = "upstream-Pa55word-never-logged"


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def failed_events(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "upstream_failed"]


async def get_manifest(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(f"{url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}) as resp:
        return resp.status, await resp.read()


async def test_connection_refused_names_upstream_host_operation_and_errno(
    start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    proxy = await start_proxy({"docker.io": f"http://127.0.0.1:{port}"})
    with structlog.testing.capture_logs() as logs:
        status, body = await get_manifest(session, proxy.url)
    assert status == 503
    [event] = failed_events(logs)
    assert event["log_level"] == "warning"
    assert event["upstream"] == "docker.io"
    assert event["host"] == f"127.0.0.1:{port}"
    assert event["operation"] == "manifest"
    assert event["kind"] == "refused"
    assert event["errno"] == errno.ECONNREFUSED
    assert "connection refused" in event["cause"] and "ECONNREFUSED" in event["cause"]
    # The client's answer is the envelope, naming the upstream only.
    assert b"UNAVAILABLE" in body and str(port).encode() not in body
    metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
    assert 'ocicache_upstream_errors_total{cause="refused",upstream="docker.io"} 1.0' in metrics
    health = proxy.app[keys.UPSTREAMS]["docker.io"].health
    assert health.last_failure is not None and health.last_failure.cause.kind == "refused"
    assert health.last_success is None


@pytest.fixture
async def silent_upstream() -> AsyncIterator[str]:
    """Accepts connections and reads requests, but never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_an_upstream_that_never_answers_is_a_timeout(
    start_proxy: StartProxy, session: aiohttp.ClientSession, silent_upstream: str
) -> None:
    proxy = await start_proxy({"docker.io": silent_upstream}, manifest_timeout=0.3)
    with structlog.testing.capture_logs() as logs:
        status, _ = await get_manifest(session, proxy.url)
    assert status == 503
    [event] = failed_events(logs)
    assert (event["kind"], event["operation"]) == ("timeout", "manifest")


async def test_a_certificate_the_proxy_does_not_trust_is_a_tls_error(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        proxy = await start_proxy({"docker.io": f"https://127.0.0.1:{port}"})
        with structlog.testing.capture_logs() as logs:
            status, _ = await get_manifest(session, proxy.url)
        assert status == 503
        [event] = failed_events(logs)
        assert event["kind"] == "tls"
        assert "certificate" in event["cause"].lower()
        assert event["host"] == f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_a_refusal_is_logged_with_its_status_and_oci_code(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    fake.rate_limit_next = 1
    proxy = await start_proxy({"docker.io": fake.url})
    with structlog.testing.capture_logs() as logs:
        status, _ = await get_manifest(session, proxy.url)
    assert status == 429
    [event] = failed_events(logs)
    assert (event["kind"], event["status"], event["code"]) == ("status", 429, "TOOMANYREQUESTS")
    assert event["cause"] == "HTTP 429 TOOMANYREQUESTS"
    metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
    assert 'ocicache_upstream_errors_total{cause="http_429",upstream="docker.io"} 1.0' in metrics


async def test_wrong_upstream_credentials_are_a_401_and_the_password_is_not_logged(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dataclasses import replace

    from proxy.cli.logs import configure
    from proxy.core.config import UpstreamConfig
    from tests.conftest import make_settings

    async with FakeUpstream(auth="basic", credentials=("puller", "the-right-one")) as fake:
        fake.add_image("library/app", make_image(), tag="v1")
        settings = replace(
            make_settings(tmp_path / "cache", {}),
            upstreams=(UpstreamConfig("docker.io", fake.url, username="puller", password=SECRET),),
        )
        configure("debug", "json")
        try:
            proxy = await start_proxy(settings=settings)
            status, body = await get_manifest(session, proxy.url)
        finally:
            configure("warning", "console")
    assert status == 403
    out = capsys.readouterr()
    assert '"event": "upstream_failed"' in out.err
    assert '"status": 401' in out.err and '"code": "UNAUTHORIZED"' in out.err
    assert SECRET not in out.err + out.out
    assert SECRET.encode() not in body


async def test_404_is_an_answer_not_a_failure(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    with structlog.testing.capture_logs() as logs:
        status, _ = await get_manifest(session, proxy.url)
    assert status == 404
    assert failed_events(logs) == []
    assert proxy.app[keys.UPSTREAMS]["docker.io"].health.last_success is not None


# --- the causes, one by one ----------------------------------------------------------------


def _key() -> ConnectionKey:
    return ConnectionKey("registry.example", 443, True, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "kind", "number"),
    [
        (aiohttp.ClientConnectorError(_key(), OSError(errno.ECONNREFUSED, "refused")), "refused", 111),
        (aiohttp.ClientConnectorError(_key(), OSError(errno.ETIMEDOUT, "timed out")), "timeout", 110),
        (aiohttp.ClientConnectorError(_key(), OSError(errno.EHOSTUNREACH, "no route")), "unreachable", 113),
        (aiohttp.ClientConnectorDNSError(_key(), OSError(-2, "Name or service not known")), "dns", -2),
        (aiohttp.ConnectionTimeoutError(), "timeout", None),
        (aiohttp.SocketTimeoutError(), "timeout", None),
        (TimeoutError(), "timeout", None),
        (aiohttp.ServerDisconnectedError(), "reset", None),
        (aiohttp.ClientPayloadError("short"), "reset", None),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "reset", 104),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls", None),
    ],
)
def test_cause_of(exc: BaseException, kind: str, number: int | None) -> None:
    cause = cause_of(exc)
    assert cause.kind == kind
    assert cause.errno == number
    assert cause.label == kind


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"errors":[{"code":"DENIED","message":"x"}]}', "DENIED"),
        (b'{"errors":[{"code":"<script>alert(1)</script>"}]}', None),  # not a code: not repeated
        (b'{"errors":[{"code":"' + b"A" * 500 + b'"}]}', None),
        (b"<html>portal</html>", None),
        (b"\xff\xfe", None),
        (b'{"errors": []}', None),
        (b"[1]", None),
        (b"[" * 100_000 + b"]" * 100_000, None),  # past the parser's depth: not a RecursionError
    ],
)
def test_only_a_real_oci_code_is_taken_from_the_body(body: bytes, code: str | None) -> None:
    assert oci_code(body) == code
    assert status_cause(502, body).label == "http_502"


def test_the_operations_are_a_fixed_set() -> None:
    assert failures.OPERATIONS == ("token", "manifest", "blob", "tags", "head", "referrers")
