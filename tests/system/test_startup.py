"""``ocicache serve`` as a process: the banner says honestly where it listens, and the
start-up log names the effective settings once, with no secret in any line it writes."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyproc import serving

PASSWORD = "upstream-Pa55word-in-env"
ADMIN = "admin-token-0123456789abcdef"


async def test_ipv6_listen_address_in_brackets_and_settings_logged_without_secrets(
    tmp_path: Path, fake: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUB_PASSWORD", PASSWORD)
    monkeypatch.setenv("OCICACHE_ADMIN_TOKEN", ADMIN)
    config = tmp_path / "ocicache.yaml"
    config.write_text(
        "upstreams:\n"
        f"  docker.io:\n    url: {fake.url}\n    username: me\n    password_env: HUB_PASSWORD\n"
        "max_cache_size: 1GiB\n"
        "tag_ttl: 5m\n"
    )
    async with serving(
        tmp_path / "cache", {}, "--config", str(config), "--listen", "[::1]:0", logs=True
    ) as proxy:
        assert proxy.url.startswith("http://[::1]:")
        assert "(cache: " in proxy.banner
        async with session.get(f"{proxy.url}/readyz") as resp:
            assert resp.status == 200
        await proxy.logged(lambda events: any(e["event"] == "listening" for e in events))
    [settings] = [e for e in proxy.events if e["event"] == "settings"]
    assert settings["listen"].startswith("http://[::1]:")
    assert settings["budget"] == 1024**3
    assert settings["tag_ttl"] == 300
    assert settings["admin_api"] is True
    assert settings["upstreams"] == [
        {
            "name": "docker.io",
            "url": fake.url,
            "username": "me",
            "credentials": "password",
            "tag_ttl": None,
            "keep_deleted": False,
        }
    ]
    everything = repr(proxy.events) + proxy.banner
    assert PASSWORD not in everything and ADMIN not in everything
