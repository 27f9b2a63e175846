"""The admin API: off without a token; a Bearer token compared in constant time, anything else
401 (hostile headers included); listing, purging (shared blobs and pins stay), pins, stats, and
prefetch jobs with per-blob progress."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.authconfig import parse_auth
from proxy.core.imageref import ImageRef
from proxy.flows.engine import Engine
from proxy.web import keys
from proxy.web.jobs import Progress
from tests.conftest import Proxy, StartProxy, raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, Image, make_image

TOKEN = "admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sharing_first_layer(base: Image, other: Image) -> Image:
    """``other`` with ``base``'s first layer in place of its own."""
    doc = json.loads(other.manifest)
    doc["layers"][0] = base.layers[0].descriptor()
    manifest = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return dataclasses.replace(
        other,
        manifest=manifest,
        manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
        layers=(base.layers[0], *other.layers[1:]),
    )


async def call(
    session: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any]:
    async with session.request(method, url, headers=AUTH if headers is None else headers, **kw) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if body else None


async def pull(session: aiohttp.ClientSession, proxy: Proxy, name: str, tag: str, image: Image) -> None:
    async with session.get(
        f"{proxy.url}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
    ) as r:
        assert r.status == 200
    for blob in image.blobs:
        async with session.get(f"{proxy.url}/v2/{name}/blobs/{blob.digest}") as r:
            assert r.status == 200
            await r.read()
    await proxy.cached()


@pytest.fixture
async def admin(start_proxy: StartProxy, fake: FakeUpstream) -> Proxy:
    return await start_proxy({"docker.io": fake.url}, admin_token=TOKEN)


async def test_off_without_a_token(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    status, _body = await call(session, "GET", f"{proxy.url}/admin/v1/images")
    assert status == 404
    assert not any(r.canonical.startswith("/admin") for r in proxy.app.router.resources())


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer " + "x" * 8000},
        {"Authorization": "Bearer"},
    ],
)
async def test_anything_but_the_token_is_401(
    admin: Proxy, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    for method, path in (
        ("GET", "/images"),
        ("GET", "/stats"),
        ("DELETE", "/images/alpine"),
        ("GET", "/nope"),
    ):
        status, body = await call(session, method, f"{admin.url}/admin/v1{path}", headers)
        assert status == 401, path
        assert body["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {TOKEN}\u00e9",  # UTF-8 bytes past ASCII
        "Bearer \u00ff\u00fe\u00fd-latin-1-0123456789",
        "Bearer \u2603\U0001f600",
    ],
)
async def test_a_non_ascii_authorization_header_is_a_401_not_a_500(admin: Proxy, value: str) -> None:
    assert admin.server.port is not None
    status, body = await raw_request(
        admin.server.port, "GET /admin/v1/images HTTP/1.1", {"Authorization": value}
    )
    assert status == 401, body
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


async def test_two_authorization_headers_are_refused(admin: Proxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.server.port)
    request = (
        "GET /admin/v1/images HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Bearer {TOKEN}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    writer.write(request.encode())
    data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 401")


async def test_exempt_from_client_auth_but_a_client_login_is_no_admin_token(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("robot:robot-token-0123456789abcdef\n")
    auth = parse_auth("auth", {"tokens_file": str(tokens), "rules": [{"users": ["*"]}]})
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN, auth=auth)
    assert (await call(session, "GET", f"{proxy.url}/admin/v1/images"))[0] == 200
    client = {"Authorization": "Bearer robot-token-0123456789abcdef"}
    assert (await call(session, "GET", f"{proxy.url}/admin/v1/images", client))[0] == 401
    assert (await call(session, "GET", f"{proxy.url}/v2/", AUTH))[0] == 401  # nor the reverse


async def test_images_lists_what_ls_shows(
    admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    status, body = await call(session, "GET", f"{admin.url}/admin/v1/images")
    assert status == 200
    [row] = body["images"]
    assert row["reference"] == "docker.io/library/app:v1"
    assert row["digest"] == image.manifest_digest
    assert row["size"] == len(image.manifest) + sum(b.size for b in image.blobs)
    assert row["pinned"] is False and row["platforms"] == []


async def test_purge_keeps_what_another_image_needs(
    admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    first = make_image(seed=1)
    second = sharing_first_layer(first, make_image(seed=2))
    fake.add_image("library/first", first, tag="v1")
    fake.add_image("library/second", second, tag="v1")
    await pull(session, admin, "library/first", "v1", first)
    await pull(session, admin, "library/second", "v1", second)
    status, body = await call(session, "DELETE", f"{admin.url}/admin/v1/images/first:v1")
    assert status == 200, body
    assert [r["reference"] for r in body["removed"]] == ["docker.io/library/first:v1"]
    gone = {first.manifest_digest, first.config.digest, first.layers[1].digest}
    assert body["files"] == len(gone)  # the shared layer stays
    held = await admin.cached()
    assert not gone & held
    assert first.layers[0].digest in held and {b.digest for b in second.blobs} <= held
    _, listed = await call(session, "GET", f"{admin.url}/admin/v1/images")
    assert [r["reference"] for r in listed["images"]] == ["docker.io/library/second:v1"]
    # The other image is still whole: pulled again without a request upstream.
    before = len(fake.seen)
    await pull(session, admin, "library/second", "v1", second)
    assert len(fake.seen) == before
    metrics = (await (await session.get(f"{admin.url}/metrics")).read()).decode()
    assert f"ocicache_purges_total {float(len(gone))}" in metrics
    assert "ocicache_evictions_total 0.0" in metrics


async def test_purge_by_digest(admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    url = f"{admin.url}/admin/v1/images/docker.io/library/app@{image.manifest_digest}"
    assert (await call(session, "DELETE", url))[0] == 200
    assert await admin.cached() == set()
    assert (await call(session, "DELETE", url))[0] == 404


@pytest.mark.parametrize(
    "path",
    [
        "/admin/v1/images/../../v2/library/app/manifests/v1",
        "/admin/v1/images/docker.io/../../etc/passwd",
        "/admin/v1/images/docker.io/library/%2e%2e/app:v1",
        "/admin/v1/images/docker.io/library/..%2f..%2fapp:v1",
        "/admin/v1/images/docker.io/Library/App:v1",
        "/admin/v1/images/nowhere.example/app:v1",
        "/admin/v1/images/" + "a" * 600,
        "/admin/v1/pins/docker.io/../../app:v1",
    ],
)
async def test_hostile_references_are_refused_and_remove_nothing(
    admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession, path: str
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    held = await admin.cached()
    assert admin.server.port is not None
    method = "PUT" if "/pins/" in path else "DELETE"
    status, body = await raw_request(
        admin.server.port, f"{method} {path} HTTP/1.1", {**AUTH, "Content-Length": "0"}
    )
    assert status in (400, 404), body
    assert await admin.cached() == held
    assert admin.app[keys.CATALOGUE].pins == {}


async def test_pins(admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    assert (await call(session, "PUT", f"{admin.url}/admin/v1/pins/app:v1"))[0] == 201
    assert (await call(session, "PUT", f"{admin.url}/admin/v1/pins/docker.io/library/app:v1"))[0] == 200
    _, body = await call(session, "GET", f"{admin.url}/admin/v1/pins")
    assert body == {"pins": [{"reference": "docker.io/library/app:v1", "source": "admin"}]}
    _, listed = await call(session, "GET", f"{admin.url}/admin/v1/images")
    assert listed["images"][0]["pinned"] is True
    status, refused = await call(session, "DELETE", f"{admin.url}/admin/v1/images/app:v1")
    assert status == 409 and refused["errors"][0]["code"] == "CONFLICT"
    assert (await call(session, "DELETE", f"{admin.url}/admin/v1/pins/app:v1"))[0] == 200
    assert (await call(session, "DELETE", f"{admin.url}/admin/v1/pins/app:v1"))[0] == 404
    assert (await call(session, "DELETE", f"{admin.url}/admin/v1/images/app:v1"))[0] == 200


async def test_a_config_pin_is_not_removed_through_the_api(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN, pins=("docker.io/library/app:v1",))
    status, _body = await call(session, "DELETE", f"{proxy.url}/admin/v1/pins/app:v1")
    assert status == 409
    assert (await call(session, "PUT", f"{proxy.url}/admin/v1/pins/app:v1"))[1]["source"] == "config"


async def test_stats(admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    await pull(session, admin, "library/app", "v1", image)
    status, body = await call(session, "GET", f"{admin.url}/admin/v1/stats")
    assert status == 200
    assert body["cache_bytes"] == len(image.manifest) + sum(b.size for b in image.blobs)
    assert body["requests"]["miss"] == 1 + len(image.blobs)
    assert body["requests"]["hit"] == 1 + len(image.blobs)
    assert body["top_images"] == [
        {
            "reference": "docker.io/library/app:v1",
            "pulls": 2,
            "hits": 1,
            "misses": 1,
            "size": body["cache_bytes"],
        }
    ]
    assert body["upstreams"][0]["name"] == "docker.io" and body["upstreams"][0]["last_success"] is not None


# --- prefetch jobs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeReport:
    images: list[str]
    blobs: int


class Scripted:
    """A prefetch that reports two blobs, waits to be let go, and reports what it did."""

    def __init__(self) -> None:
        self.halfway = asyncio.Event()
        self.go = asyncio.Event()
        self.calls: list[tuple[list[str], frozenset[str] | None]] = []

    async def __call__(
        self,
        engine: Engine,
        references: list[ImageRef],
        *,
        platforms: frozenset[str] | None = None,
        progress: Any = None,
    ) -> FakeReport:
        assert isinstance(engine, Engine)
        self.calls.append(([str(r) for r in references], platforms))
        sink: Progress = progress
        sink.blob_started(references[0], "sha256:" + "a" * 64, 100)
        sink.blob_advanced("sha256:" + "a" * 64, 30)
        sink.blob_advanced("sha256:" + "a" * 64, 10)
        sink.blob_finished("sha256:" + "b" * 64, 50, fetched=False)
        sink.reference_finished({"reference": str(references[1]), "ok": True})
        self.halfway.set()
        await self.go.wait()
        sink.blob_finished("sha256:" + "a" * 64, 100, fetched=True)
        return FakeReport([str(r) for r in references], 2)


async def halfway(scripted: Scripted, proxy: Proxy, job_id: str) -> None:
    """Wait until the scripted prefetch is half done; fail, not hang, if the job ends first."""
    job = proxy.app[keys.JOBS].get(job_id)
    assert job is not None
    waits = [asyncio.ensure_future(scripted.halfway.wait()), asyncio.ensure_future(job.ended.wait())]
    try:
        async with asyncio.timeout(120):  # a bound, not a measurement
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    assert scripted.halfway.is_set(), job.to_json()


async def test_prefetch_job_progress_and_outcome(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    scripted = Scripted()
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN, prefetch=scripted)
    status, body = await call(
        session,
        "POST",
        f"{proxy.url}/admin/v1/prefetch",
        json={"references": ["alpine:3.20", "docker.io/library/busybox"], "platforms": ["linux/amd64"]},
    )
    assert status == 202
    job_url = f"{proxy.url}{body['url']}"
    await halfway(scripted, proxy, body["id"])
    _, running = await call(session, "GET", job_url)
    assert running["state"] == "running"
    assert running["blobs"]["sha256:" + "a" * 64] == {
        "size": 100,
        "done": 40,
        "state": "running",
        "error": None,
    }
    assert running["blobs"]["sha256:" + "b" * 64]["state"] == "cached"
    assert running["references_done"] == [{"reference": "docker.io/library/busybox:latest", "ok": True}]
    assert (running["blobs_done"], running["blobs_total"]) == (1, 2)
    metrics = (await (await session.get(f"{proxy.url}/metrics")).read()).decode()
    assert 'ocicache_prefetch_jobs{state="running"} 1.0' in metrics
    assert 'ocicache_prefetch_blobs{state="pending"} 1.0' in metrics
    scripted.go.set()
    _, done = await call(session, "GET", job_url + "?wait=30")
    assert done["state"] == "done"
    assert done["outcome"] == {
        "images": ["docker.io/library/alpine:3.20", "docker.io/library/busybox:latest"],
        "blobs": 2,
    }
    assert scripted.calls == [
        (["docker.io/library/alpine:3.20", "docker.io/library/busybox:latest"], frozenset({"linux/amd64"}))
    ]
    _, listed = await call(session, "GET", f"{proxy.url}/admin/v1/jobs")
    assert [j["id"] for j in listed["jobs"]] == [body["id"]]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "REQUEST_INVALID"),
        (b"{}", "REQUEST_INVALID"),
        (b'{"references": []}', "REQUEST_INVALID"),
        (b'{"references": [1]}', "REQUEST_INVALID"),
        (b'{"references": ["../../etc/passwd"]}', "NAME_INVALID"),
        (b'{"references": ["alpine"], "platforms": "linux/amd64"}', "REQUEST_INVALID"),
        (b'{"references": ["alpine"], "platforms": ["linux"]}', "REQUEST_INVALID"),
        (b'{"references": ["alpine"], "platforms": ["<script>/x"]}', "REQUEST_INVALID"),
        (json.dumps({"references": ["alpine"] * 1001}).encode(), "REQUEST_INVALID"),
        (b'{"references": ["' + b"a" * 300_000 + b'"]}', "REQUEST_INVALID"),
        (b"[" * 100_000 + b"]" * 100_000, "REQUEST_INVALID"),  # past the parser's depth
    ],
)
async def test_bad_prefetch_requests(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, payload: bytes, code: str
) -> None:
    scripted = Scripted()
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN, prefetch=scripted)
    status, body = await call(session, "POST", f"{proxy.url}/admin/v1/prefetch", data=payload)
    assert 400 <= status < 500 and body["errors"][0]["code"] == code
    assert scripted.calls == []


async def test_unknown_job(admin: Proxy, session: aiohttp.ClientSession) -> None:
    assert (await call(session, "GET", f"{admin.url}/admin/v1/jobs/nope"))[0] == 404


async def test_a_body_that_arrives_in_pieces_is_read_whole() -> None:
    from unittest import mock

    from aiohttp import StreamReader

    from proxy.web.admin import read_json

    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    body = json.dumps({"references": ["alpine:3.20", "busybox"]}).encode()
    stream.feed_data(body[:10])  # what one packet brought; the rest comes later
    reading = asyncio.ensure_future(read_json(stream, None))
    # Let the read take what is buffered first: its first step was scheduled before this one.
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done
    stream.feed_data(body[10:])
    stream.feed_eof()
    assert await reading == {"references": ["alpine:3.20", "busybox"]}


async def test_a_flood_of_prefetch_jobs_is_bounded(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    from proxy.web.jobs import MAX_QUEUED

    scripted = Scripted()  # the first job holds the runner until told to go
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN, prefetch=scripted)
    url = f"{proxy.url}/admin/v1/prefetch"
    status, first = await call(session, "POST", url, json={"references": ["alpine", "busybox"]})
    assert status == 202
    await halfway(scripted, proxy, first["id"])
    for _ in range(MAX_QUEUED):
        assert (await call(session, "POST", url, json={"references": ["alpine", "busybox"]}))[0] == 202
    status, body = await call(session, "POST", url, json={"references": ["alpine", "busybox"]})
    assert status == 503 and body["errors"][0]["code"] == "UNAVAILABLE"
    scripted.go.set()


async def test_the_real_prefetch_through_the_api(
    admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(layer_sizes=(5000, 70_000))
    fake.add_image("library/app", image, tag="v1")
    status, body = await call(
        session, "POST", f"{admin.url}/admin/v1/prefetch", json={"references": ["app:v1"]}
    )
    assert status == 202
    _, done = await call(session, "GET", f"{admin.url}/admin/v1/jobs/{body['id']}?wait=60")
    assert done["state"] == "done", done
    assert (done["blobs_done"], done["blobs_total"]) == (len(image.blobs), len(image.blobs))
    assert {b.digest: b.size for b in image.blobs} == {d: b["size"] for d, b in done["blobs"].items()}
    assert all(b["state"] == "done" and b["done"] == b["size"] for b in done["blobs"].values())
    assert done["outcome"]["references"][0]["ok"] is True
    assert done["references_done"][0]["reference"] == "docker.io/library/app:v1"
    assert {image.manifest_digest, *(b.digest for b in image.blobs)} <= await admin.cached()
    # Pulled afterwards, all of it comes from the cache.
    before = len(fake.seen)
    await pull(session, admin, "library/app", "v1", image)
    assert len(fake.seen) == before


def test_job_progress_is_a_prefetch_progress() -> None:
    from proxy.airgap.prefetch import PrefetchProgress
    from proxy.web.jobs import Job, JobProgress

    sink: PrefetchProgress = JobProgress(Job("x", [], None))  # checked by mypy
    assert sink is not None


async def test_a_purge_under_a_running_download_leaves_that_client_whole(
    admin: Proxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(layer_sizes=(8 * 1024 * 1024,), seed=5)
    fake.add_image("library/app", image, tag="v1")
    await pull(session, admin, "library/app", "v1", image)
    layer = image.layers[0]
    async with session.get(f"{admin.url}/v2/library/app/blobs/{layer.digest}") as resp:
        first = await resp.content.readexactly(64 * 1024)
        status, _body = await call(session, "DELETE", f"{admin.url}/admin/v1/images/app:v1")
        assert status == 200 and layer.digest not in await admin.cached()
        rest = await resp.read()
    assert hashlib.sha256(first + rest).hexdigest() == layer.digest.split(":")[1]
