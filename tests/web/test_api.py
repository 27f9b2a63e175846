"""The pull API end to end through ocicache, against the in-process fake upstream."""

from __future__ import annotations

import hashlib
import json
import os

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from proxy.core.links import next_link
from proxy.core.reference import TAG_RE
from proxy.web.handlers import tags_page
from tests.conftest import StartProxy, raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, OCI_MANIFEST, make_image


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def expect_error(session: aiohttp.ClientSession, url: str, status: int, code: str) -> None:
    async with session.get(url) as resp:
        assert resp.status == status
        assert_oci_error(await resp.read(), code)


def assert_oci_error(body: bytes, code: str) -> None:
    doc = json.loads(body)
    assert doc["errors"][0]["code"] == code
    assert {"code", "message", "detail"} <= set(doc["errors"][0])


async def test_base_endpoint(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(f"{proxy.url}/v2/") as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert await resp.json() == {}


# What a cache directory holds, and nothing else (the database's WAL files included).
CACHE_LAYOUT = ["blobs", "index.db", "index.db-shm", "index.db-wal", "lock", "tmp"]

BAD_REQUESTS = [
    ("GET /v2/../../etc/passwd HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/library%2Falpine/manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/library/alpine/blobs/sha256:../../x HTTP/1.1", {}, 400, "DIGEST_INVALID"),
    ("GET /v2/library/alpine/blobs/sha256:abc HTTP/1.1", {}, 400, "DIGEST_INVALID"),
    (f"GET /v2/library/alpine/blobs/sha256:{'z' * 64} HTTP/1.1", {}, 400, "DIGEST_INVALID"),
    (f"GET /v2/library/alpine/blobs/sha256:{'A' * 64} HTTP/1.1", {}, 400, "DIGEST_INVALID"),
    (f"GET /v2/library/alpine/blobs/md5:{'a' * 32} HTTP/1.1", {}, 400, "DIGEST_INVALID"),
    ("GET /v2/Library/Alpine/manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/library//alpine/manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/library/alpine//manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    (f"GET /v2/{'a' * 300}/manifests/latest HTTP/1.1", {}, 400, "NAME_INVALID"),
    ("GET /v2/library/alpine/manifests/-latest HTTP/1.1", {}, 400, "TAG_INVALID"),
    (f"GET /v2/library/alpine/manifests/{'t' * 200} HTTP/1.1", {}, 400, "TAG_INVALID"),
    ("GET /etc/passwd HTTP/1.1", {}, 404, "NAME_UNKNOWN"),
    ("POST /v2/library/alpine/blobs/uploads/ HTTP/1.1", {"Content-Length": "0"}, 405, "UNSUPPORTED"),
    ("PUT /v2/library/alpine/manifests/latest HTTP/1.1", {"Content-Length": "0"}, 405, "UNSUPPORTED"),
    ("PATCH /v2/library/alpine/blobs/uploads/x HTTP/1.1", {"Content-Length": "0"}, 405, "UNSUPPORTED"),
    (f"DELETE /v2/library/alpine/blobs/sha256:{'a' * 64} HTTP/1.1", {}, 405, "UNSUPPORTED"),
    ("GET /v2/library/alpine/tags/list?n=x HTTP/1.1", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET /v2/library/alpine/tags/list?n=%C2%B2 HTTP/1.1", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET /v2/library/alpine/tags/list?n=-1 HTTP/1.1", {}, 400, "PAGINATION_NUMBER_INVALID"),
    # Over aiohttp's header limits: refused by its parser, still in the OCI envelope.
    ("GET /v2/ HTTP/1.1", {"X-Big": "a" * 9000}, 400, "REQUEST_INVALID"),
    ("GET /v2/ HTTP/1.1", {f"X-H{i}": "v" for i in range(200)}, 400, "REQUEST_INVALID"),
    ("GET /v2/" + "a" * 9000 + " HTTP/1.1", {}, 400, "REQUEST_INVALID"),
    ("NOT-HTTP", {}, 400, "REQUEST_INVALID"),
    ("GET /v2/ HTTP/1.1", {"Bad\x01Header": "x"}, 400, "REQUEST_INVALID"),
]


@pytest.mark.parametrize(("line", "headers", "status", "code"), BAD_REQUESTS)
async def test_bad_input_gets_a_4xx_oci_error_and_the_proxy_keeps_serving(
    start_proxy: StartProxy, fake: FakeUpstream, line: str, headers: dict[str, str], status: int, code: str
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    got, body = await raw_request(proxy.server.port or 0, line, headers)
    assert got == status
    assert_oci_error(body, code)
    assert b"Traceback" not in body
    # Nothing reached upstream, and no file was created outside the cache's own layout.
    assert fake.seen == []
    assert sorted(os.listdir(proxy.settings.cache_dir)) == CACHE_LAYOUT
    status_after, _ = await raw_request(proxy.server.port or 0, "GET /v2/ HTTP/1.1")
    assert status_after == 200


async def test_manifest_by_tag_and_digest(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=5)
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    for ref in ("v1", digest):
        for method in ("GET", "HEAD"):
            async with session.request(
                method, f"{proxy.url}/v2/app/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT}
            ) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == OCI_MANIFEST
                assert resp.headers["Docker-Content-Digest"] == digest
                assert int(resp.headers["Content-Length"]) == len(image.manifest)
                assert await resp.read() == (image.manifest if method == "GET" else b"")
    # One GET for the tag (fresh afterwards) and none for the digest: it was stored by the first.
    assert fake.count(origin="registry", method="GET", path_contains="/manifests/") == 1


async def test_manifest_without_accept_asks_for_all_types(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=6)
    fake.add_manifest("library/app", image.manifest, OCI_MANIFEST, tag="v1")
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(f"{proxy.url}/v2/library/app/manifests/v1") as resp:
        assert resp.status == 200
    sent = next(s for s in fake.seen if "/manifests/" in s.path)
    accept = sent.headers.get("accept") or sent.headers.get("Accept", "")
    for media_type in MANIFEST_ACCEPT.split(", "):
        assert media_type in accept


async def test_unknown_manifest_and_blob_are_404(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    await expect_error(session, f"{proxy.url}/v2/library/app/manifests/nope", 404, "MANIFEST_UNKNOWN")
    await expect_error(session, f"{proxy.url}/v2/library/app/blobs/sha256:{'1' * 64}", 404, "BLOB_UNKNOWN")


async def test_manifest_fetched_by_digest_is_verified(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(seed=7)
    digest = fake.add_manifest("library/app", image.manifest, OCI_MANIFEST)
    # The fake now answers that digest with other bytes.
    fake._manifests[("library/app", digest)] = (image.manifest + b" ", OCI_MANIFEST)
    proxy = await start_proxy({"docker.io": fake.url})
    await expect_error(session, f"{proxy.url}/v2/library/app/manifests/{digest}", 502, "UPSTREAM_ERROR")
    assert digest not in (await proxy.cached())


async def test_blob_get_head_and_ranges(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(10_000)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url})
    url = f"{proxy.url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:  # cold
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["Docker-Content-Digest"] == digest
    assert digest in (await proxy.cached())
    async with session.head(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
    async with session.get(url, headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        assert await resp.read() == data[100:200]
    async with session.get(url, headers={"Range": "bytes=-10"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data[-10:]
    for bad in ("bytes=500-0", "bytes=50000-100000"):
        async with session.get(url, headers={"Range": bad}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
            assert_oci_error(await resp.read(), "RANGE_INVALID")
    assert fake.count(origin="registry", method="GET", path_contains="/blobs/") == 1


async def test_upstream_down_and_nothing_cached_is_503(
    start_proxy: StartProxy, session: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await start_proxy({"docker.io": f"http://127.0.0.1:{unused_tcp_port}"})
    await expect_error(session, f"{proxy.url}/v2/library/app/manifests/v1", 503, "UNAVAILABLE")
    await expect_error(session, f"{proxy.url}/v2/library/app/blobs/sha256:{'2' * 64}", 503, "UNAVAILABLE")


async def test_upstream_429_is_429_with_retry_after(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.rate_limit_next = 10
    fake.retry_after = 42
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(f"{proxy.url}/v2/library/app/manifests/v1") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "42"
        assert_oci_error(await resp.read(), "TOOMANYREQUESTS")


async def test_tags_list_clamps_n(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    for i in range(5):
        fake.add_manifest("library/app", make_image(seed=i).manifest, OCI_MANIFEST, tag=f"t{i}")
    proxy = await start_proxy({"docker.io": fake.url}, tags_page_max=3)
    async with session.get(f"{proxy.url}/v2/library/app/tags/list?n=100000") as resp:
        assert resp.status == 200
        body = await resp.json()
        assert len(body["tags"]) == 3
        assert resp.headers["Link"].startswith("</v2/library/app/tags/list?")
    sent = next(s for s in fake.seen if s.path.endswith("/tags/list"))
    assert sent.query["n"] == "3"


async def test_head_of_an_uncached_blob_asks_upstream_and_downloads_nothing(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(70_000)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.head(f"{proxy.url}/v2/library/app/blobs/{digest}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Docker-Content-Digest"] == digest
    async with session.head(f"{proxy.url}/v2/library/app/blobs/sha256:{'3' * 64}") as resp:
        assert resp.status == 404
    assert fake.count(method="GET", path_contains="/blobs/") == 0
    assert digest not in (await proxy.cached())


async def test_digit_bombs_are_answered_not_crashed_on(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(1000)
    digest = fake.add_blob(data)
    fake.add_manifest("library/app", make_image(seed=8).manifest, OCI_MANIFEST, tag="t1")
    proxy = await start_proxy({"docker.io": fake.url}, tags_page_max=3)
    url = f"{proxy.url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:
        assert await resp.read() == data
    bomb = "9" * 5000
    # A last byte past the end is clamped to the end; a first byte past it cannot be served.
    async with session.get(url, headers={"Range": f"bytes=0-{bomb}"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data
    async with session.get(url, headers={"Range": f"bytes={bomb}-"}) as resp:
        assert resp.status == 416
    async with session.get(url, headers={"Range": f"bytes=-{bomb}"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data
    async with session.get(url, headers={"Range": "bytes=\u00b2-"}) as resp:
        assert resp.status == 416
    async with session.get(f"{proxy.url}/v2/library/app/tags/list?n={bomb}") as resp:
        assert resp.status == 200
        assert (await resp.json())["tags"] == ["t1"]
    sent = [s for s in fake.seen if s.path.endswith("/tags/list")]
    assert sent[-1].query["n"] == "3"


async def test_the_next_page_link_keeps_the_upstream_a_client_chose(
    start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    async with FakeUpstream() as hub, FakeUpstream() as other:
        for i in range(5):
            other.add_manifest("org/app", make_image(seed=60 + i).manifest, OCI_MANIFEST, tag=f"t{i}")
        proxy = await start_proxy({"docker.io": hub.url, "ghcr.io": other.url})
        tags: list[str] = []
        url: str | None = f"{proxy.url}/v2/org/app/tags/list?n=2&ns=ghcr.io"
        while url is not None:
            async with session.get(url) as resp:
                assert resp.status == 200, await resp.text()
                tags += (await resp.json())["tags"]
                link = resp.headers.get("Link")
            url = None if link is None else proxy.url + link.split(";")[0].strip("<>")
        assert tags == [f"t{i}" for i in range(5)]
        assert hub.count(path_contains="/tags/list") == 0


# --- tags/list paging, as a pure function: any n and last, and the pages a client walks ------

tag_sets = st.lists(st.from_regex(TAG_RE, fullmatch=True), unique=True, max_size=30)


@given(tag_sets, st.integers(0, 12), st.one_of(st.none(), st.text(max_size=12)))
def test_a_page_is_the_next_n_tags_after_last(names: list[str], n: int, last: str | None) -> None:
    page, more = tags_page(names, n, last)
    after = sorted(t for t in names if last is None or t > last)
    assert page == after[:n]
    assert more == (bool(page) and len(after) > n)


@given(tag_sets, st.integers(1, 12))
def test_following_next_links_lists_every_tag_once(names: list[str], n: int) -> None:
    seen: list[str] = []
    last: str | None = None
    for _ in range(len(names) + 1):
        page, more = tags_page(names, n, last)
        seen += page
        if not more:
            break
        link = next_link(f'<?n={n}&last={page[-1]}>; rel="next"', "/v2/a/tags/list", {"ns": "docker.io"})
        assert link is not None
        query = URL(link[1 : link.index(">")]).query
        assert query["ns"] == "docker.io" and query["n"] == str(n)
        last = query["last"]
    assert seen == sorted(names)
