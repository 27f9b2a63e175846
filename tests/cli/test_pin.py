"""``ocicache pin`` / ``unpin``: on a cache directory, and through a running proxy (--proxy)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream

TOKEN = "admin-token-0123456789abcdef"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_on_a_cache_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run(capsys, "pin", "alpine:3.20", "ghcr.io/org/app@sha256:" + "a" * 64, *cache)[0] == 0
    code, out, _ = run(capsys, "pin", *cache)
    assert code == 0
    assert out.splitlines() == [
        "docker.io/library/alpine:3.20\tadmin",
        "ghcr.io/org/app@sha256:" + "a" * 64 + "\tadmin",
    ]
    assert run(capsys, "unpin", "docker.io/library/alpine:3.20", *cache)[0] == 0
    code, _, err = run(capsys, "unpin", "alpine:3.20", *cache)
    assert code == 1 and "is not pinned" in err
    code, _, err = run(capsys, "pin", "nowhere.example/x:1", *cache)
    assert code == 2 and "not configured" in err


async def test_a_running_proxy_holds_the_directory_and_takes_pins_over_its_api(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await start_proxy({"docker.io": fake.url}, admin_token=TOKEN)
    cache = ["--cache-dir", str(proxy.settings.cache_dir)]
    code, _, err = await asyncio.to_thread(run, capsys, "pin", "alpine:3.20", *cache)
    assert code == 2 and "--proxy URL" in err
    code, _, err = await asyncio.to_thread(run, capsys, "pin", "alpine:3.20", "--proxy", proxy.url)
    assert code == 1 and "OCICACHE_ADMIN_TOKEN" in err
    monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", TOKEN)
    code, out, _ = await asyncio.to_thread(run, capsys, "pin", "alpine:3.20", "--proxy", proxy.url)
    assert (code, out) == (0, "pinned docker.io/library/alpine:3.20\n")
    assert proxy.app[keys.CATALOGUE].pins == {"docker.io/library/alpine:3.20": "admin"}
    code, out, _ = await asyncio.to_thread(run, capsys, "pin", "--proxy", proxy.url)
    assert out == "docker.io/library/alpine:3.20\tadmin\n"
    assert (await asyncio.to_thread(run, capsys, "unpin", "alpine:3.20", "--proxy", proxy.url))[0] == 0
    code, _, err = await asyncio.to_thread(run, capsys, "unpin", "alpine:3.20", "--proxy", proxy.url)
    assert code == 1 and "404 MANIFEST_UNKNOWN: not pinned" in err
    monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", TOKEN + "-wrong")
    code, _, err = await asyncio.to_thread(run, capsys, "pin", "--proxy", proxy.url)
    assert code == 1 and "401" in err and TOKEN not in err
