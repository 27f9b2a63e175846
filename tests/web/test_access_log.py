"""The access log line: the bytes each response really carried (streamed or not), the cache
result, and the upstream a request went to, however it was routed."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest
import structlog

from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image


def access(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "request"]


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **headers: str) -> tuple[int, bytes]:
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_bytes_are_what_each_response_carried(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, info_logs: None
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    layer = image.blobs[-1].digest
    requests = [
        ("GET", "/v2/library/app/tags/list", {}),  # passed through
        ("GET", "/setup/docker", {}),
        ("GET", "/setup/containerd?registry=docker.io", {}),
        ("GET", "/healthz", {}),
        ("HEAD", f"/v2/library/app/blobs/{layer}", {}),  # upstream answers; nothing downloads
        ("GET", "/v2/library/app/manifests/v1", {"Accept": MANIFEST_ACCEPT}),
        ("GET", f"/v2/library/app/blobs/{layer}", {}),
        ("GET", f"/v2/library/app/blobs/{layer}", {"Range": "bytes=0-9"}),
        ("GET", "/v2/library/nothing/manifests/v1", {"Accept": MANIFEST_ACCEPT}),  # an error
        ("GET", "/no/such/endpoint", {}),
    ]
    got = []
    with structlog.testing.capture_logs() as logs:
        for method, path, headers in requests:
            status, body = await fetch(session, method, proxy.url + path, **headers)
            got.append((path, status, len(body)))
    lines = access(logs)
    assert [(e["path"], e["status"], e["bytes"]) for e in lines] == [
        (p.split("?")[0], s, n) for p, s, n in got
    ]
    assert all(
        n > 0 for method, (_, _, n) in zip((r[0] for r in requests), got, strict=True) if method == "GET"
    )
    tags = lines[0]
    assert tags["cache"] == "pass" and tags["bytes"] > 0 and tags["upstream"] == "docker.io"
    assert lines[4]["cache"] == "pass" and lines[4]["bytes"] == 0  # HEAD: no body


@pytest.mark.parametrize(
    ("path", "query", "upstream", "repository"),
    [
        ("/v2/ghcr.io/org/app/manifests/v1", "", "ghcr.io", "org/app"),  # path-routed
        ("/v2/org/app/manifests/v1", "?ns=ghcr.io", "ghcr.io", "org/app"),  # containerd's ns=
        ("/v2/library/app/manifests/v1", "", "docker.io", "library/app"),  # the default
    ],
)
async def test_the_chosen_upstream_is_logged_however_it_was_routed(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    path: str,
    query: str,
    upstream: str,
    repository: str,
    info_logs: None,
) -> None:
    async with FakeUpstream() as hub, FakeUpstream() as ghcr:
        image = make_image()
        {"docker.io": hub, "ghcr.io": ghcr}[upstream].add_image(repository, image, tag="v1")
        proxy = await start_proxy({"docker.io": hub.url, "ghcr.io": ghcr.url})
        with structlog.testing.capture_logs() as logs:
            status, _ = await fetch(session, "GET", proxy.url + path + query, Accept=MANIFEST_ACCEPT)
    assert status == 200
    [line] = access(logs)
    assert line["upstream"] == upstream
    assert line["cache"] == "miss"
