"""The status page's HTML (the page in a real browser is tests/system/test_status_browser.py):
escaped, self-contained, read-only, and under auth.rules showing nothing a rule hides."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import aiohttp
import bcrypt

from proxy.core.authconfig import parse_auth
from proxy.web import keys
from proxy.web.samples import Minute, Sample, bars, per_minute, window
from proxy.web.status import ago, human_bytes, percent
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


async def page(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    async with session.get(url + "/", headers=headers) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


async def test_the_page_is_self_contained_and_read_only(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url, "ghcr.io": fake.url})
    status, html, headers = await page(session, proxy.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<meta http-equiv="refresh"' in html
    assert "<script" not in html and "<form" not in html and "<link" not in html
    assert not re.search(r"""\s(src|href)=""", html)  # nothing fetched from anywhere
    assert "<svg" in html
    # Every client's configuration, as /setup/* serves it (escaped for HTML).
    async with session.get(f"{proxy.url}/setup/registries.conf") as resp:
        conf = await resp.text()
    assert conf.replace('"', "&#34;") in html
    for method in ("POST", "PUT", "DELETE"):
        async with session.request(method, proxy.url + "/") as resp:
            assert resp.status in (404, 405)


async def test_upstream_text_is_escaped(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    fake.ratelimit_remaining = HOSTILE  # type: ignore[assignment]  # what a hostile upstream may send
    proxy = await start_proxy({"docker.io": fake.url})
    async with session.get(
        f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    ) as r:
        assert r.status == 200
    assert proxy.app[keys.UPSTREAMS]["docker.io"].ratelimit_remaining is not None
    _, html, _ = await page(session, proxy.url)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


async def test_a_hostile_host_header_does_not_reach_the_page(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy({"docker.io": fake.url})
    status, html, _ = await page(session, proxy.url, Host='evil"><script>alert(1)</script>')
    assert status == 200
    assert "<script>" not in html and "evil" not in html


async def test_under_rules_the_page_shows_only_what_anonymous_clients_may_pull(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-pw-0123', bcrypt.gensalt(4)).decode()}\n")
    auth = parse_auth(
        "auth",
        {
            "htpasswd": str(htpasswd),
            "anonymous": True,
            "rules": [
                {"anonymous": True, "upstreams": ["docker.io"], "repositories": ["library/*"]},
                {"users": ["ci"]},
            ],
        },
    )
    async with FakeUpstream() as hub, FakeUpstream() as internal:
        image = make_image()
        hub.add_image("library/app", image, tag="v1")
        internal.add_image("team/secret-project", image, tag="v1")
        proxy = await start_proxy(
            {"docker.io": hub.url, "internal": internal.url},
            auth=auth,
            pins=("internal/team/secret-project:v1", "docker.io/library/app:v1"),
        )
        ci = {
            "Authorization": "Basic " + base64.b64encode(b"ci:ci-pw-0123").decode(),
            "Accept": MANIFEST_ACCEPT,
        }
        for url, headers in (
            (f"{proxy.url}/v2/library/app/manifests/v1", {"Accept": MANIFEST_ACCEPT}),
            (f"{proxy.url}/v2/internal/team/secret-project/manifests/v1", ci),
        ):
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
        for headers in ({}, ci):  # credentials do not widen what the public page shows
            status, html, _ = await page(session, proxy.url, **headers)
            assert status == 200
            assert "docker.io/library/app:v1" in html
            assert "secret-project" not in html and "team/" not in html
            assert internal.url.split("//")[1] not in html  # nor the upstreams' hosts
            assert "only what a client without credentials may pull" in html


async def test_with_logins_required_the_page_shows_no_repository(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("robot:robot-token-0123456789abcdef\n")
    auth = parse_auth("auth", {"tokens_file": str(tokens)})
    fake.add_image("library/app", make_image(), tag="v1")
    proxy = await start_proxy({"docker.io": fake.url}, auth=auth)
    headers = {"Authorization": "Bearer robot-token-0123456789abcdef", "Accept": MANIFEST_ACCEPT}
    async with session.get(f"{proxy.url}/v2/library/app/manifests/v1", headers=headers) as resp:
        assert resp.status == 200
    status, html, _ = await page(session, proxy.url)
    assert status == 200
    assert "library/app" not in html


# --- pure pieces ------------------------------------------------------------------------------


def test_formatting() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(20 * 1024**3) == "20.0 GiB"
    assert human_bytes(None) == "-"
    assert percent(None) == "-" and percent(0.5) == "50.0%"
    assert ago(None) == "never" and ago(100.0, 130.0) == "30 s ago" and ago(0.0, 7200.0) == "2.0 h ago"


def s(at: float, cached: float, requests: float) -> Sample:
    return Sample(at, cached, requests, cached * 10, requests * 10, 0.0)


def test_per_minute_buckets_and_the_last_hour() -> None:
    samples = [s(0, 0, 0), s(60, 5, 10), s(120, 5, 10), s(180, 20, 30)]
    now = s(240, 20, 40)
    minutes = per_minute(samples, now, minutes=4)
    assert minutes == [
        Minute(0, 5.0, 5.0),
        Minute(60, 0.0, 0.0),
        Minute(120, 15.0, 5.0),
        Minute(180, 0.0, 10.0),
    ]
    assert window(samples, now, 3600) == (20.0, 40.0, 200.0, 400.0)  # younger than an hour: since start
    assert window(samples, now, 120) == (15.0, 30.0, 150.0, 300.0)


def test_bars_stack_cached_under_the_rest() -> None:
    [a, b] = bars([Minute(0, 5, 5), Minute(60, 0, 0)], width=100, height=100)
    assert (a.cached_height, a.other_height) == (50.0, 50.0)
    assert a.cached_y == 50.0 and a.other_y == 0.0
    assert b.cached_height == b.other_height == 0.0
    assert bars([]) == []
