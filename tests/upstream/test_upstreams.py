"""Routing between upstreams, upstream authentication, redirects, rate limits, and the rule
that one repository's layers are not another's — against the fake upstream and a real
htpasswd-protected docker-registry. Every connection is to loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.core.config import UpstreamConfig
from tests.conftest import Proxy, StartProxy, make_settings
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST, make_image, push_image
from tests.support.registry import running_registry

USER, SECRET = "puller", "s3cret-Pa55"


def upstream(name: str, url: str, **kw: object) -> UpstreamConfig:
    return UpstreamConfig(name, url, **kw)  # type: ignore[arg-type]


async def start_with(start_proxy: StartProxy, tmp_path: Path, *ups: UpstreamConfig, **kw: object) -> Proxy:
    settings = replace(make_settings(tmp_path / "cache", {}, **kw), upstreams=ups)
    return await start_proxy(settings=settings)


async def get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with session.get(url, headers={"Accept": MANIFEST_ACCEPT, **headers}) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


@pytest.fixture
async def hub() -> AsyncIterator[FakeUpstream]:
    """Behaves like Docker Hub: token service on its own origin, blobs via 307 to a CDN."""
    async with FakeUpstream(auth="bearer", credentials=(USER, SECRET), cdn=True) as fake:
        yield fake


class Trap:
    """A loopback listener that records every connection: proof that nothing dialled it."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Trap:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


# --- routing ---------------------------------------------------------------------------------


async def test_one_proxy_two_upstreams_by_ns_prefix_and_default(
    start_proxy: StartProxy, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with FakeUpstream() as hub_fake, FakeUpstream() as ghcr_fake:
        hub_img, ghcr_img = make_image(seed=41), make_image(seed=42)
        hub_fake.add_manifest("library/app", hub_img.manifest, OCI_MANIFEST, tag="v1")
        ghcr_fake.add_manifest("org/app", ghcr_img.manifest, OCI_MANIFEST, tag="v1")
        proxy = await start_with(
            start_proxy, tmp_path, upstream("docker.io", hub_fake.url), upstream("ghcr.io", ghcr_fake.url)
        )
        cases = [
            (f"{proxy.url}/v2/app/manifests/v1", hub_img.manifest),
            (f"{proxy.url}/v2/library/app/manifests/v1?ns=docker.io", hub_img.manifest),
            (f"{proxy.url}/v2/org/app/manifests/v1?ns=ghcr.io", ghcr_img.manifest),
            (f"{proxy.url}/v2/ghcr.io/org/app/manifests/v1", ghcr_img.manifest),
            (f"{proxy.url}/v2/docker.io/library/app/manifests/v1", hub_img.manifest),
        ]
        for url, expected in cases:
            status, body, _ = await get(session, url)
            assert (status, body) == (200, expected), url
        assert hub_fake.count(path_contains="/v2/library/app/manifests/") == 1  # cached per upstream
        assert ghcr_fake.count(path_contains="/v2/org/app/manifests/") == 1


async def test_client_named_hosts_are_never_dialled(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with Trap() as trap:
        proxy = await start_with(start_proxy, tmp_path, upstream("docker.io", fake.url))
        for path in (
            f"/v2/x/manifests/latest?ns=127.0.0.1:{trap.port}",
            "/v2/x/manifests/latest?ns=evil.test",
            f"/v2/127.0.0.1:{trap.port}/x/manifests/latest",
            f"/v2/x/blobs/sha256:{'a' * 64}?ns=127.0.0.1:{trap.port}",
        ):
            status, body, _ = await get(session, proxy.url + path)
            assert status == 404, path
            assert error_code(body) == "NAME_UNKNOWN"
        assert trap.connections == 0
        assert fake.seen == []


# --- authentication --------------------------------------------------------------------------


def hub_upstream(hub: FakeUpstream, **kw: object) -> UpstreamConfig:
    token_host = hub.token_url.removeprefix("http://")
    return upstream("docker.io", hub.url, realm_hosts=(token_host,), **kw)


async def test_anonymous_token_flow_and_cdn_redirect_without_authorization(
    start_proxy: StartProxy, hub: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=43, layer_sizes=(300_000,))
    hub.add_image("library/app", image, tag="v1")
    proxy = await start_with(start_proxy, tmp_path, hub_upstream(hub))
    status, body, _ = await get(session, f"{proxy.url}/v2/app/manifests/v1")
    assert (status, body) == (200, image.manifest)
    for blob in image.blobs:
        status, body, _ = await get(session, f"{proxy.url}/v2/app/blobs/{blob.digest}")
        assert (status, body) == (200, blob.data)
    token_requests = [s for s in hub.seen if s.origin == "token"]
    assert len(token_requests) == 1  # one token per scope, reused while fresh
    assert token_requests[0].query["service"] == "fake-registry"
    assert token_requests[0].query["scope"] == "repository:library/app:pull"
    assert "authorization" not in token_requests[0].headers  # anonymous: no credentials configured
    cdn = [s for s in hub.seen if s.origin == "cdn"]
    assert len(cdn) == len(image.blobs)
    assert all("authorization" not in s.headers for s in cdn)


async def test_expired_token_is_renewed_on_401(
    start_proxy: StartProxy, hub: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    for i in range(2):
        hub.add_manifest("library/app", make_image(seed=50 + i).manifest, OCI_MANIFEST, tag=f"v{i}")
    proxy = await start_with(start_proxy, tmp_path, hub_upstream(hub))
    assert (await get(session, f"{proxy.url}/v2/app/manifests/v0"))[0] == 200
    hub.expire_tokens()
    assert (await get(session, f"{proxy.url}/v2/app/manifests/v1"))[0] == 200
    assert hub.count(origin="token") == 2


async def test_private_repository_needs_configured_credentials(
    start_proxy: StartProxy, hub: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=44)
    hub.private_repos.add("team/private")
    hub.add_manifest("team/private", image.manifest, OCI_MANIFEST, tag="v1")
    anonymous = await start_with(start_proxy, tmp_path / "a", hub_upstream(hub))
    status, body, _ = await get(session, f"{anonymous.url}/v2/team/private/manifests/v1")
    assert status in (403, 404)
    assert error_code(body) in ("DENIED", "NAME_UNKNOWN")
    with_creds = await start_with(
        start_proxy, tmp_path / "b", hub_upstream(hub, username=USER, password=SECRET)
    )
    status, body, _ = await get(session, f"{with_creds.url}/v2/team/private/manifests/v1")
    assert (status, body) == (200, image.manifest)
    token_request = [s for s in hub.seen if s.origin == "token"][-1]
    assert token_request.headers["authorization"].startswith("Basic ")


async def test_token_realm_on_an_untrusted_origin_gets_no_request(
    start_proxy: StartProxy, hub: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    hub.add_manifest("library/app", make_image(seed=45).manifest, OCI_MANIFEST, tag="v1")
    # The token service is another loopback origin, and this configuration does not trust it.
    proxy = await start_with(
        start_proxy, tmp_path, upstream("docker.io", hub.url, username=USER, password=SECRET)
    )
    status, body, _ = await get(session, f"{proxy.url}/v2/app/manifests/v1")
    assert status == 403
    assert error_code(body) == "DENIED"
    assert hub.count(origin="token") == 0


@pytest.fixture
async def basic_fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(auth="basic", credentials=(USER, SECRET)) as fake:
        yield fake


async def test_http_basic_upstream(
    start_proxy: StartProxy, basic_fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=46)
    basic_fake.add_manifest("team/app", image.manifest, OCI_MANIFEST, tag="v1")
    without = await start_with(start_proxy, tmp_path / "a", upstream("r.io", basic_fake.url))
    assert (await get(session, f"{without.url}/v2/team/app/manifests/v1"))[0] == 403
    proxy = await start_with(
        start_proxy, tmp_path / "b", upstream("r.io", basic_fake.url, username=USER, password=SECRET)
    )
    assert (await get(session, f"{proxy.url}/v2/team/app/manifests/v1"))[:2] == (200, image.manifest)


async def test_credential_command_supplies_and_caches_credentials(
    start_proxy: StartProxy, basic_fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    counter = tmp_path / "calls"
    helper = tmp_path / "helper.sh"
    helper.write_text(f"#!/bin/sh\necho x >> {counter}\necho '{USER}:{SECRET}'\n")
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    for i in range(3):
        basic_fake.add_manifest("team/app", make_image(seed=60 + i).manifest, OCI_MANIFEST, tag=f"v{i}")
    proxy = await start_with(
        start_proxy,
        tmp_path,
        upstream("r.io", basic_fake.url, credential_command=str(helper), credential_ttl=600.0),
    )
    for i in range(3):
        assert (await get(session, f"{proxy.url}/v2/team/app/manifests/v{i}"))[0] == 200
    assert counter.read_text().count("x") == 1


async def test_docker_config_json_auths(
    start_proxy: StartProxy, basic_fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=47)
    basic_fake.add_manifest("team/app", image.manifest, OCI_MANIFEST, tag="v1")
    config = tmp_path / "config.json"
    encoded = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    config.write_text(json.dumps({"auths": {"r.io": {"auth": encoded}}}))
    proxy = await start_with(start_proxy, tmp_path, upstream("r.io", basic_fake.url), docker_config=config)
    assert (await get(session, f"{proxy.url}/v2/team/app/manifests/v1"))[:2] == (200, image.manifest)


async def test_real_registry_with_htpasswd_as_private_upstream(
    start_proxy: StartProxy, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=48)
    with running_registry(tmp_path / "registry", htpasswd=(USER, SECRET)) as registry:
        await push_image(session, registry.url, "team/app", image, tag="v1", auth=(USER, SECRET))
        proxy = await start_with(
            start_proxy, tmp_path, upstream("registry.internal", registry.url, username=USER, password=SECRET)
        )
        assert (await get(session, f"{proxy.url}/v2/team/app/manifests/v1"))[:2] == (200, image.manifest)
        for blob in image.blobs:
            assert (await get(session, f"{proxy.url}/v2/team/app/blobs/{blob.digest}"))[:2] == (
                200,
                blob.data,
            )


async def test_credentials_never_reach_clients_or_logs(
    start_proxy: StartProxy,
    hub: FakeUpstream,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from proxy.cli.logs import configure

    configure("debug", "json")  # everything the proxy can log
    image = make_image(seed=49)
    hub.private_repos.add("team/private")
    hub.add_image("team/private", image, tag="v1")
    proxy = await start_with(start_proxy, tmp_path, hub_upstream(hub, username=USER, password=SECRET))
    seen: list[str] = []
    urls = [
        "/v2/team/private/manifests/v1",
        "/v2/team/private/manifests/nope",
        f"/v2/team/private/blobs/{image.layers[0].digest}",
        "/metrics",
        "/v2/",
    ]
    for path in urls:
        _, body, headers = await get(session, proxy.url + path)
        seen += [body.decode(errors="replace"), json.dumps(headers)]
    hub.expire_tokens()
    seen.append((await get(session, f"{proxy.url}/v2/team/private/manifests/v1"))[1].decode())
    captured = capfd.readouterr()
    configure("warning", "console")
    haystack = "\n".join([*seen, captured.out, captured.err])
    basic = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    assert '"event": "request"' in captured.err  # the logs were captured
    for secret in (SECRET, basic, *hub._tokens):
        assert secret not in haystack


# --- redirects and rate limits -----------------------------------------------------------------


async def test_redirect_loop_is_502(
    start_proxy: StartProxy, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    hops = 0

    async def loop(request: web.Request) -> web.Response:
        nonlocal hops
        hops += 1
        raise web.HTTPTemporaryRedirect(f"/v2/hop{hops}/manifests/v1")

    app = web.Application()
    app.router.add_get("/{tail:.*}", loop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        proxy = await start_with(
            start_proxy, tmp_path, upstream("r.io", f"http://127.0.0.1:{runner.addresses[0][1]}")
        )
        status, body, _ = await get(session, f"{proxy.url}/v2/app/manifests/v1")
        assert status == 502
        assert error_code(body) == "UPSTREAM_ERROR"
        assert hops == 6  # the first request and five redirects followed
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "headers",
    [
        # Addresses yarl cannot read: a bracket left open, a port past 65535.
        {"status": "307", "Location": "http://[::1/v2/x"},
        {"status": "302", "Location": "//127.0.0.1:99999/v2/x"},
        {"status": "401", "WWW-Authenticate": 'Bearer realm="http://[::1/token",service="x"'},
        {"status": "401", "WWW-Authenticate": 'Bearer realm="http://127.0.0.1:99999/token"'},
    ],
)
async def test_an_upstream_address_that_cannot_be_read_is_502(
    start_proxy: StartProxy, tmp_path: Path, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    async def answer(request: web.Request) -> web.Response:
        rest = {k: v for k, v in headers.items() if k != "status"}
        return web.Response(status=int(headers["status"]), headers=rest)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        proxy = await start_with(start_proxy, tmp_path, upstream("r.io", url, username=USER, password=SECRET))
        for path in ("/v2/app/manifests/v1", "/v2/app/blobs/sha256:" + "a" * 64, "/v2/app/tags/list"):
            status, body, _ = await get(session, proxy.url + path)
            assert status == 502, (path, body)
            assert error_code(body) == "UPSTREAM_ERROR"
    finally:
        await runner.cleanup()


async def test_rate_limited_upstream(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=51, layer_sizes=(5000,))
    fake.add_image("library/app", image, tag="v1")
    fake.ratelimit_remaining = 77
    proxy = await start_with(start_proxy, tmp_path, upstream("docker.io", fake.url), tag_ttl=0.0)
    assert (await get(session, f"{proxy.url}/v2/app/manifests/v1"))[0] == 200
    layer = image.layers[0]
    assert (await get(session, f"{proxy.url}/v2/app/blobs/{layer.digest}"))[0] == 200
    fake.rate_limit_next = 100
    fake.retry_after = 30
    # Cached content is served: the stale tag (ttl 0) and the blob.
    assert (await get(session, f"{proxy.url}/v2/app/manifests/v1"))[:2] == (200, image.manifest)
    assert (await get(session, f"{proxy.url}/v2/app/blobs/{layer.digest}"))[:2] == (200, layer.data)
    # Nothing cached: 429 with upstream's Retry-After, never a 500.
    status, body, headers = await get(session, f"{proxy.url}/v2/app/manifests/other")
    assert (status, headers["Retry-After"], error_code(body)) == (429, "30", "TOOMANYREQUESTS")
    status, _, headers = await get(session, f"{proxy.url}/v2/app/blobs/{image.config.digest}")
    assert (status, headers["Retry-After"]) == (429, "30")
    metrics = (await get(session, f"{proxy.url}/metrics"))[1].decode()
    assert 'ocicache_upstream_ratelimit_remaining{upstream="docker.io"} 77.0' in metrics


# --- one repository's layers are not another's -------------------------------------------------


async def test_blob_cached_through_one_repository_needs_upstream_confirmation_for_another(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    secret_layer = os.urandom(50_000)
    digest = fake.add_blob(secret_layer, repos=["team/private"])
    async with FakeUpstream() as other:
        proxy = await start_with(
            start_proxy, tmp_path, upstream("docker.io", fake.url), upstream("ghcr.io", other.url)
        )
        assert (await get(session, f"{proxy.url}/v2/team/private/blobs/{digest}"))[:2] == (200, secret_layer)
        # Another repository, same upstream: upstream says it does not hold it.
        status, body, _ = await get(session, f"{proxy.url}/v2/public/app/blobs/{digest}")
        assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
        # Another upstream altogether.
        status, _, _ = await get(session, f"{proxy.url}/v2/team/private/blobs/{digest}?ns=ghcr.io")
        assert status == 404
        # Once upstream holds it in the other repository too, it is served from the cache.
        fake.add_blob(secret_layer, repos=["public/app"])
        assert (await get(session, f"{proxy.url}/v2/public/app/blobs/{digest}"))[:2] == (200, secret_layer)
        assert fake.count(method="GET", path_contains="/blobs/") == 1
        assert fake.count(method="HEAD", path_contains="/v2/public/app/blobs/") == 2
        # The confirmation is remembered.
        assert (await get(session, f"{proxy.url}/v2/public/app/blobs/{digest}"))[0] == 200
        assert fake.count(method="HEAD", path_contains="/v2/public/app/blobs/") == 2


async def test_manifest_by_digest_is_not_served_to_another_repository_unconfirmed(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=52)
    digest = fake.add_manifest("team/private", image.manifest, OCI_MANIFEST, tag="v1")
    proxy = await start_with(start_proxy, tmp_path, upstream("docker.io", fake.url))
    assert (await get(session, f"{proxy.url}/v2/team/private/manifests/v1"))[0] == 200
    status, body, _ = await get(session, f"{proxy.url}/v2/public/app/manifests/{digest}")
    assert (status, error_code(body)) == (404, "MANIFEST_UNKNOWN")
    # The owning repository still gets it by digest from the cache.
    assert (await get(session, f"{proxy.url}/v2/team/private/manifests/{digest}"))[:2] == (
        200,
        image.manifest,
    )
    assert fake.count(method="GET", path_contains="/manifests/") == 1


async def test_resume_after_reset_renews_token_and_signed_url(
    start_proxy: StartProxy, hub: FakeUpstream, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = hub.add_blob(data)
    hub.faults[digest] = BlobFaults(stall_at=1024 * 1024, reset_at=2 * 1024 * 1024)
    proxy = await start_with(start_proxy, tmp_path, hub_upstream(hub))
    fetch = asyncio.create_task(get(session, f"{proxy.url}/v2/app/blobs/{digest}"))
    await hub.faults[digest].stalled.wait()
    # While the download hangs, its token and its signed CDN URL both expire; then it breaks.
    hub.expire_tokens()
    hub.expire_signatures()
    hub.faults[digest].resume()
    status, body, _ = await fetch
    assert (status, body) == (200, data)
    assert hub.count(origin="token") == 2
    cdn_gets = [s for s in hub.seen if s.origin == "cdn"]
    assert len(cdn_gets) == 2
    assert cdn_gets[0].query["sig"] != cdn_gets[1].query["sig"]
    assert "range" in cdn_gets[1].headers
