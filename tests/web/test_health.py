"""/healthz stays a plain liveness answer; /readyz is 503 with its reasons whenever the proxy
cannot do its work: the catalogue closed, the cache directory not writable (a real read-only
file system), or the process shutting down."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiohttp

from proxy.web import keys
from proxy.web.health import readiness
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.smallfs import fill_up, small_fs


async def probe(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with session.get(url) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_ready_and_alive(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    assert await probe(session, f"{proxy.url}/healthz") == (200, {"status": "ok"})
    assert await probe(session, f"{proxy.url}/readyz") == (200, {"status": "ready"})
    assert fake.seen == []  # neither asks upstream anything


async def test_not_ready_while_shutting_down(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    proxy.app[keys.LIFECYCLE].stopping = True  # what serve() does on SIGTERM, before it drains
    assert await probe(session, f"{proxy.url}/readyz") == (
        503,
        {"status": "unavailable", "reasons": ["shutting down"]},
    )
    assert (await probe(session, f"{proxy.url}/healthz"))[0] == 200


async def test_not_ready_when_the_catalogue_is_closed(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    await proxy.app[keys.CATALOGUE].close()
    status, body = await probe(session, f"{proxy.url}/readyz")
    assert status == 503
    assert body["reasons"] == ["catalogue: not open"]


async def test_not_ready_when_the_cache_directory_takes_no_new_file(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    tmp = proxy.app[keys.STORAGE].tmp
    shutil.rmtree(tmp)  # someone cleaned up the wrong directory
    status, body = await probe(session, f"{proxy.url}/readyz")
    assert status == 503
    reasons = body["reasons"]
    assert isinstance(reasons, list) and len(reasons) == 1
    assert str(reasons[0]) == f"cache directory: cannot write in {tmp}: No such file or directory"
    tmp.mkdir()
    assert (await probe(session, f"{proxy.url}/readyz"))[0] == 200


async def test_a_full_disk_is_still_ready(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # Cached content is still served and fills stream through: no reason to stop pulls here.
    with small_fs(tmp_path / "fs", "4m") as fs:
        proxy = await start_proxy({"docker.io": fake.url}, cache_dir=fs / "cache")
        filler = fill_up(fs)
        try:
            assert (await probe(session, f"{proxy.url}/readyz"))[0] == 200
        finally:
            filler.unlink()
        await proxy.server.close()


def test_reasons_in_order() -> None:
    assert readiness(catalogue=None, cache_dir=None, stopping=False) == []
    assert readiness(catalogue="not open", cache_dir="full", stopping=True) == [
        "shutting down",
        "catalogue: not open",
        "cache directory: full",
    ]
