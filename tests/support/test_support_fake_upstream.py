"""Tests of the fake upstream itself, driven with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.fake_upstream import SERVICE, BlobFaults, FakeUpstream, digest_of

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BIG = 300_000  # several CHUNKs, so faults land mid-stream


def _blob(size: int = BIG) -> bytes:
    return os.urandom(size)


def _challenge(header: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


def _no_stray_tasks() -> None:
    # close() must leave nothing running (stalled handlers, waiters, ...).
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def _read_until_broken(resp: aiohttp.ClientResponse) -> bytes:
    got = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            got += chunk
    return bytes(got)


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_listens_on_loopback_ephemeral_ports() -> None:
    async with FakeUpstream(auth="bearer", credentials=("u", "p"), cdn=True) as fake:
        urls = {fake.url, fake.token_url, fake.cdn_url}
        assert len(urls) == 3
        assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+", u) for u in urls)
    _no_stray_tasks()


async def test_base_and_manifests(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{up.url}/v2/") as r:
        assert r.status == 200
        assert await r.json() == {}
        assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    body = b'{"schemaVersion":2,"mediaType":"%s"}' % OCI_MANIFEST.encode()
    digest = up.add_manifest("a/b/c", body, OCI_MANIFEST, tag="v1")
    assert digest == digest_of(body)
    for ref in ("v1", digest):
        async with client.get(f"{up.url}/v2/a/b/c/manifests/{ref}") as r:
            assert r.status == 200
            assert await r.read() == body
            assert r.headers["Content-Type"] == OCI_MANIFEST
            assert r.headers["Docker-Content-Digest"] == digest
            assert r.headers["Content-Length"] == str(len(body))
    async with client.head(f"{up.url}/v2/a/b/c/manifests/v1") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(body))
        assert r.headers["Docker-Content-Digest"] == digest
        assert await r.read() == b""
    for path in ("a/b/c/manifests/v2", "a/b/manifests/v1", f"other/manifests/{digest}"):
        async with client.get(f"{up.url}/v2/{path}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_name_containing_route_words(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    digest = up.add_manifest("x/blobs/manifests", b"{}", OCI_MANIFEST, tag="t")
    async with client.get(f"{up.url}/v2/x/blobs/manifests/manifests/t") as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == digest


async def test_blob_full_ranged_and_scoped(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob()
    digest = up.add_blob(data)
    url = f"{up.url}/v2/library/alpine/blobs/{digest}"
    async with client.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(data))
        assert r.headers["Docker-Content-Digest"] == digest
        assert await r.read() == data
    async with client.get(url, headers={"Range": "bytes=1000-"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert await r.read() == data[1000:]
    async with client.get(url, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert r.headers["Content-Length"] == "10"
        assert await r.read() == data[10:20]
    async with client.get(url, headers={"Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    async with client.head(url) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(data))
        assert await r.read() == b""

    scoped = up.add_blob(b"only in team/app", repos=["team/app"])
    async with client.get(f"{up.url}/v2/team/app/blobs/{scoped}") as r:
        assert await r.read() == b"only in team/app"
    for path in (f"library/alpine/blobs/{scoped}", f"team/app/blobs/{digest_of(b'nope')}"):
        async with client.get(f"{up.url}/v2/{path}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_tags_list_pagination(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    for tag in ("c", "a", "d", "b"):
        up.add_manifest("lib/x", tag.encode(), OCI_MANIFEST, tag=tag)
    async with client.get(f"{up.url}/v2/lib/x/tags/list") as r:
        assert await r.json() == {"name": "lib/x", "tags": ["a", "b", "c", "d"]}
        assert "Link" not in r.headers
    async with client.get(f"{up.url}/v2/lib/x/tags/list", params={"n": "2"}) as r:
        assert (await r.json())["tags"] == ["a", "b"]
        assert r.headers["Link"] == '</v2/lib/x/tags/list?n=2&last=b>; rel="next"'
    async with client.get(f"{up.url}/v2/lib/x/tags/list", params={"n": "2", "last": "b"}) as r:
        assert (await r.json())["tags"] == ["c", "d"]
        assert "Link" not in r.headers
    async with client.get(f"{up.url}/v2/nope/tags/list") as r:
        assert r.status == 404


async def test_reset_then_range_resume(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob()
    digest = up.add_blob(data)
    up.faults[digest] = BlobFaults(reset_at=100_000)
    url = f"{up.url}/v2/r/blobs/{digest}"
    async with client.get(url) as r:
        assert r.headers["Content-Length"] == str(len(data))
        first = await _read_until_broken(r)
    # Flushed before the abort, so the client gets exactly reset_at bytes.
    assert first == data[:100_000]
    async with client.get(url, headers={"Range": f"bytes={len(first)}-"}) as r:
        assert r.status == 206
        rest = await r.read()
    assert hashlib.sha256(first + rest).hexdigest() == digest.removeprefix("sha256:")
    assert up.count(path_contains=digest, with_range=True) == 1
    assert up.count(path_contains=digest, with_range=False) == 1


async def test_reset_times(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob()
    digest = up.add_blob(data)
    up.faults[digest] = BlobFaults(reset_at=70_000, reset_times=3)
    url = f"{up.url}/v2/r/blobs/{digest}"
    async with client.get(url, headers={"Range": "bytes=100000-"}) as r:
        assert await r.read() == data[100_000:]  # starts past the fault: untouched
    got = b""
    for _ in range(3):  # the fault is at a blob offset, so resumes stall there
        async with client.get(url, headers={"Range": f"bytes={len(got)}-"}) as r:
            got += await _read_until_broken(r)
    assert got == data[:70_000]
    async with client.get(url, headers={"Range": f"bytes={len(got)}-"}) as r:
        got += await r.read()
    assert got == data


async def test_stall_until_released(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob()
    digest = up.add_blob(data)
    faults = up.faults[digest] = BlobFaults(stall_at=100_000, release=asyncio.Event())
    async with client.get(f"{up.url}/v2/r/blobs/{digest}", headers={"Range": "bytes=200000-"}) as r:
        assert await r.read() == data[200_000:]  # does not cover the stall point
    async with client.get(f"{up.url}/v2/r/blobs/{digest}") as r:
        head = await r.content.readexactly(100_000)
        await faults.stalled.wait()
        # Nothing past the stall point can have been sent yet.
        assert r.content.total_bytes == 100_000
        assert up.count(path_contains=digest) == 2
        assert faults.release is not None
        faults.release.set()
        assert head + await r.read() == data


async def test_close_ends_a_stall_without_stray_tasks(client: aiohttp.ClientSession) -> None:
    fake = FakeUpstream()
    await fake.start()
    digest = fake.add_blob(_blob())
    faults = fake.faults[digest] = BlobFaults(stall_at=10)  # release defaults to a fresh Event
    async with client.get(f"{fake.url}/v2/r/blobs/{digest}") as r:
        await r.content.readexactly(10)
        await faults.stalled.wait()
        await fake.close()
        assert await _read_until_broken(r) == b""
    await client.close()
    _no_stray_tasks()


async def test_manifest_can_stall_too(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    digest = up.add_manifest("m", b'{"x": 1}', OCI_MANIFEST, tag="t")
    faults = up.faults[digest] = BlobFaults(stall_at=0)  # headers sent, body held back

    async def fetch() -> bytes:
        async with client.get(f"{up.url}/v2/m/manifests/t") as r:
            assert r.headers["Content-Length"] == "8"
            return await r.read()

    task = asyncio.create_task(fetch())
    await faults.stalled.wait()
    assert not task.done()
    assert faults.release is not None
    faults.release.set()
    assert await task == b'{"x": 1}'


async def test_corrupt_changes_digest_not_length(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob()
    digest = up.add_blob(data)
    up.faults[digest] = BlobFaults(corrupt_at=123_456)
    async with client.get(f"{up.url}/v2/r/blobs/{digest}") as r:
        got = await r.read()
        assert r.headers["Docker-Content-Digest"] == digest  # the lie a bad upstream tells
    assert len(got) == len(data)
    assert digest_of(got) != digest
    assert [i for i in range(len(data)) if got[i] != data[i]] == [123_456]
    async with client.get(f"{up.url}/v2/r/blobs/{digest}", headers={"Range": "bytes=123456-123456"}) as r:
        assert await r.read() == got[123_456:123_457]


async def test_throttle_slows_the_body(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data = _blob(20_000)
    digest = up.add_blob(data)
    up.faults[digest] = BlobFaults(throttle_bps=100_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(f"{up.url}/v2/r/blobs/{digest}") as r:
        assert await r.read() == data
    # Measured, not waited for: 20 kB at 100 kB/s is at least ~0.2 s.
    assert loop.time() - started >= 0.15


async def test_rate_limit(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    up.add_manifest("lib/x", b"{}", OCI_MANIFEST, tag="t")
    up.rate_limit_next = 2
    up.ratelimit_remaining = 42
    statuses = []
    for _ in range(3):
        async with client.get(f"{up.url}/v2/lib/x/manifests/t") as r:
            statuses.append(r.status)
            assert r.headers["ratelimit-limit"] == "100;w=21600"
            assert r.headers["ratelimit-remaining"] == "42;w=21600"
            if r.status == 429:
                assert r.headers["Retry-After"] == "7"
                assert (await r.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert statuses == [429, 429, 200]
    assert up.count(path_contains="/manifests/") == 3


async def test_bearer_flow(client: aiohttp.ClientSession) -> None:
    async with FakeUpstream(auth="bearer", credentials=("alice", "s3cret"), token_ttl=60) as fake:
        fake.add_manifest("library/alpine", b"{}", OCI_MANIFEST, tag="3")
        fake.add_manifest("corp/secret", b"{}", OCI_MANIFEST, tag="1")
        fake.private_repos.add("corp/secret")
        url = f"{fake.url}/v2/library/alpine/manifests/3"

        async with client.get(f"{fake.url}/v2/") as r:
            assert r.status == 401
            assert "scope" not in _challenge(r.headers["WWW-Authenticate"])
        async with client.get(url) as r:
            assert r.status == 401
            header = r.headers["WWW-Authenticate"]
        assert header.startswith("Bearer ")
        ch = _challenge(header)
        assert ch == {
            "realm": f"{fake.token_url}/token",
            "service": SERVICE,
            "scope": "repository:library/alpine:pull",
        }
        async with client.get(ch["realm"], params={"service": ch["service"], "scope": ch["scope"]}) as r:
            assert r.status == 200
            tok = await r.json()
        assert tok["token"] == tok["access_token"]
        assert tok["expires_in"] == 60
        assert tok["issued_at"].endswith("Z")
        bearer = {"Authorization": f"Bearer {tok['token']}"}
        async with client.get(url, headers=bearer) as r:
            assert r.status == 200
        async with client.get(f"{fake.url}/v2/corp/secret/manifests/1", headers=bearer) as r:
            assert r.status == 401  # token is bound to its scope
            assert _challenge(r.headers["WWW-Authenticate"])["error"] == "insufficient_scope"

        fake.expire_tokens()
        async with client.get(url, headers=bearer) as r:
            assert r.status == 401

        realm = f"{fake.token_url}/token"
        private = {"service": SERVICE, "scope": "repository:corp/secret:pull"}
        async with client.get(realm, params=private) as r:
            assert r.status == 401  # no anonymous tokens for private repos
        async with client.get(realm, params=private, headers=_basic("alice", "wrong")) as r:
            assert r.status == 401
        async with client.get(realm, params={"service": "elsewhere", "scope": private["scope"]}) as r:
            assert r.status == 400
        async with client.get(realm, params=private, headers=_basic("alice", "s3cret")) as r:
            secret_token = (await r.json())["token"]
        async with client.get(
            f"{fake.url}/v2/corp/secret/manifests/1", headers={"Authorization": f"Bearer {secret_token}"}
        ) as r:
            assert r.status == 200

        assert fake.count(origin="token") == 5
        token_seen = [s for s in fake.seen if s.origin == "token"]
        assert token_seen[0].query == {"service": SERVICE, "scope": "repository:library/alpine:pull"}
        assert "authorization" in token_seen[-1].headers


async def test_basic_auth(client: aiohttp.ClientSession) -> None:
    async with FakeUpstream(auth="basic", credentials=("bob", "pw")) as fake:
        async with client.get(f"{fake.url}/v2/") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Basic realm="fake"'
        async with client.get(f"{fake.url}/v2/", headers=_basic("bob", "bad")) as r:
            assert r.status == 401
        async with client.get(f"{fake.url}/v2/", headers=_basic("bob", "pw")) as r:
            assert r.status == 200


async def test_cdn_redirect(client: aiohttp.ClientSession) -> None:
    async with FakeUpstream(cdn=True) as fake:
        data = _blob()
        digest = fake.add_blob(data)
        fake.faults[digest] = BlobFaults(reset_at=1000)
        async with client.get(f"{fake.url}/v2/lib/x/blobs/{digest}", allow_redirects=False) as r:
            assert r.status == 307
            location = r.headers["Location"]
        assert location.startswith(f"{fake.cdn_url}/blobs/{digest}?sig=")
        async with client.get(location, headers={"Authorization": "Bearer abc"}) as r:
            assert r.status == 400
        async with client.get(location) as r:  # faults apply on the CDN too
            assert await _read_until_broken(r) == data[:1000]
        async with client.get(location, headers={"Range": "bytes=1000-"}) as r:
            assert r.status == 206
            assert await r.read() == data[1000:]
        async with client.head(f"{fake.url}/v2/lib/x/blobs/{digest}") as r:
            assert r.status == 200  # HEAD is answered by the registry itself
        # Following the redirect automatically works too.
        async with client.get(f"{fake.url}/v2/lib/x/blobs/{digest}") as r:
            assert await r.read() == data

        fake.expire_signatures()
        async with client.get(location) as r:
            assert r.status == 403
        assert fake.count(origin="cdn") == 5
        assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 2


async def test_counts(up: FakeUpstream, client: aiohttp.ClientSession) -> None:
    digest = up.add_blob(b"abc")
    for headers in ({}, {"Range": "bytes=1-"}, {"Range": "bytes=2-"}):
        async with client.get(f"{up.url}/v2/r/blobs/{digest}", headers=headers) as r:
            await r.read()
    async with client.head(f"{up.url}/v2/r/blobs/{digest}") as r:
        pass
    async with client.post(f"{up.url}/v2/r/blobs/uploads/") as r:
        assert r.status == 405  # pull-only
    assert up.count() == 5
    assert up.count(method="get") == 3
    assert up.count(method="HEAD") == 1
    assert up.count(with_range=True) == 2
    assert up.count(with_range=False, method="GET") == 1
    assert up.count(origin="cdn") == 0
    assert up.count(path_contains="/uploads/") == 1
    assert up.seen[1].headers["range"] == "bytes=1-"


async def test_the_fake_lists_referrers_with_paging_filtering_and_no_api_modes(up: FakeUpstream) -> None:
    from tests.support.images import (
        SBOM_TYPE,
        SIGNATURE_TYPE,
        make_image,
        make_referrer,
        referrer_descriptor,
    )

    subject = make_image(seed=1)
    sig = make_referrer(subject, SIGNATURE_TYPE, b"sig")
    sbom = make_referrer(subject, SBOM_TYPE, b"sbom", with_artifact_type=False)
    for image in (subject, sig, sbom):
        up.add_image("app", image)
    url = f"{up.url}/v2/app/referrers/{subject.manifest_digest}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as resp:
            doc = await resp.json(content_type=None)
            assert doc["manifests"] == [referrer_descriptor(sig), referrer_descriptor(sbom)]
            # Without artifactType in the manifest, the config's media type stands in.
            assert doc["manifests"][1]["artifactType"] == SBOM_TYPE
        async with s.get(url, params={"artifactType": SBOM_TYPE}) as resp:
            assert resp.headers["OCI-Filters-Applied"] == "artifactType"
            assert len((await resp.json(content_type=None))["manifests"]) == 1
        up.referrers_page = 1
        async with s.get(url) as resp:
            assert len((await resp.json(content_type=None))["manifests"]) == 1
            assert (
                resp.headers["Link"]
                == f'</v2/app/referrers/{subject.manifest_digest}?last={sig.manifest_digest}>; rel="next"'
            )
        async with s.get(url, params={"last": sig.manifest_digest}) as resp:
            assert (await resp.json(content_type=None))["manifests"] == [referrer_descriptor(sbom)]
            assert "Link" not in resp.headers
        for mode, status in (("404", 404), ("405", 405), ("redirect-404", 404)):
            up.referrers_mode = mode  # type: ignore[assignment]
            async with s.get(url) as resp:
                assert resp.status == status
