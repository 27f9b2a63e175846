"""``ocicache ls | rm | prefetch --proxy URL``: the same commands through a running proxy's
admin API (the proxy holds the cache directory, so they could not open it themselves)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.cli.main import main
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image

TOKEN = "admin-token-0123456789abcdef"


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_prefetch_ls_rm_through_the_proxy(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", TOKEN)
    image = make_image(layer_sizes=(3000, 9000))
    other = make_image(layer_sizes=(2000,))
    fake.add_image("library/app", image, tag="v1")
    fake.add_image("library/other", other, tag="v2")
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN)
    upstream = ["--upstream", f"docker.io={fake.url}", "--proxy", proxy.url]

    code, out, err = await run(capsys, "prefetch", "app:v1", "other:v2", *upstream)
    assert code == 0, err
    assert out.splitlines()[0].startswith("prefetch job ")
    assert "2 references; 5 blobs fetched" in out  # configs and layers
    held = await proxy.cached()
    assert {b.digest for b in image.blobs + other.blobs} | {
        image.manifest_digest,
        other.manifest_digest,
    } <= held

    code, out, _ = await run(capsys, "ls", *upstream)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["REFERENCE", "DIGEST"]
    assert [line.split()[0] for line in lines[1:3]] == [
        "docker.io/library/app:v1",
        "docker.io/library/other:v2",
    ]
    assert lines[-1].startswith("2 images; 7 blobs")  # manifests too
    code, out, _ = await run(capsys, "ls", "--json", *upstream)
    assert [i["reference"] for i in json.loads(out)["images"]] == [
        "docker.io/library/app:v1",
        "docker.io/library/other:v2",
    ]

    code, out, _ = await run(capsys, "rm", "app:v1", "nothere:v9", *upstream)
    assert code == 1  # one of them was not cached, as the local rm says
    assert f"removed docker.io/library/app:v1 {image.manifest_digest}" in out
    assert "no such image: docker.io/library/nothere:v9" in out
    assert "freed 4 blobs" in out
    assert not {b.digest for b in image.blobs} & await proxy.cached()
    async with session.get(
        f"{proxy.url}/v2/library/other/manifests/v2", headers={"Accept": MANIFEST_ACCEPT}
    ) as r:
        assert r.status == 200
    code, _, err = await run(capsys, "rm", "--unused-for", "1d", *upstream)
    assert code == 2 and "through --proxy" in err


async def test_without_the_token_or_with_a_wrong_one(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN)
    monkeypatch.delenv("OCICACHE_ADMIN_TOKEN", raising=False)
    code, _, err = await run(capsys, "ls", "--proxy", proxy.url)
    assert code == 1 and "OCICACHE_ADMIN_TOKEN" in err
    monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", TOKEN + "-wrong")
    code, _, err = await run(capsys, "ls", "--proxy", proxy.url)
    assert code == 1 and "401" in err and TOKEN not in err
    code, _, err = await run(capsys, "ls", "--proxy", "ftp://nowhere")
    assert code == 1 and "http(s)://" in err


@pytest.mark.parametrize("body", [b"<html>a login portal</html>", b"[" * 100_000 + b"]" * 100_000])
async def test_an_answer_that_is_not_json_is_a_message_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def anything(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", TOKEN)
        code, out, err = await run(capsys, "ls", "--proxy", str(server.make_url("")))
    finally:
        await server.close()
    assert code != 0 and out == ""
    assert "not JSON" in err and "Traceback" not in err
