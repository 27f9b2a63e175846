"""No credential, token or Authorization value ever reaches the log, at debug level, whatever
clients send: logins right and wrong, static and issued tokens, the admin token right and
wrong, upstream credentials (Basic to the upstream), hostile headers, upstream failures."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from proxy.cli.logs import configure
from proxy.core.authconfig import parse_auth
from proxy.core.config import UpstreamConfig
from tests.conftest import StartProxy, make_settings, raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image

USER, PASSWORD = "ci", "client-Pa55word-9f8e"
STATIC = "static-token-a1b2c3d4e5f6a7b8"
ADMIN = "admin-token-0f1e2d3c4b5a6978"
UPSTREAM_USER, UPSTREAM_PASSWORD = "puller", "upstream-Pa55word-7d6c"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_no_secret_in_any_log_line(
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"robot:{STATIC}\n")
    auth = parse_auth(
        "auth",
        {
            "htpasswd": str(htpasswd),
            "tokens_file": str(tokens),
            "anonymous": True,
            "rules": [{"users": ["*"]}],
        },
    )
    issued: list[str] = []
    configure("debug", "json")
    try:
        async with FakeUpstream(auth="basic", credentials=(UPSTREAM_USER, UPSTREAM_PASSWORD)) as fake:
            fake.add_image("library/app", make_image(), tag="v1")
            settings = replace(
                make_settings(tmp_path / "cache", {}, auth=auth, admin_token=ADMIN),
                upstreams=(
                    UpstreamConfig("docker.io", fake.url, username=UPSTREAM_USER, password=UPSTREAM_PASSWORD),
                    UpstreamConfig("gone.example", "http://127.0.0.1:9"),
                ),
            )
            proxy = await start_proxy(settings=settings)
            good = {"Authorization": f"Basic {b64(f'{USER}:{PASSWORD}')}"}
            async with session.get(f"{proxy.url}/auth/token?service=ocicache", headers=good) as resp:
                issued.append((await resp.json())["token"])
            manifest = f"{proxy.url}/v2/library/app/manifests/v1"
            attempts: list[tuple[str, dict[str, str]]] = [
                (manifest, good),
                (manifest, {"Authorization": f"Basic {b64(f'{USER}:{PASSWORD}-wrong')}"}),
                (manifest, {"Authorization": f"Bearer {STATIC}"}),
                (manifest, {"Authorization": f"Bearer {STATIC}-wrong"}),
                (manifest, {"Authorization": f"Bearer {issued[0]}"}),
                (f"{proxy.url}/v2/gone.example/x/manifests/v1", good),  # an upstream failure
                (f"{proxy.url}/admin/v1/images", {"Authorization": f"Bearer {ADMIN}"}),
                (f"{proxy.url}/admin/v1/stats", {"Authorization": f"Bearer {ADMIN}-wrong"}),
                (f"{proxy.url}/admin/v1/images", {"Authorization": f"Basic {b64('admin:' + ADMIN)}"}),
                (f"{proxy.url}/", {"Authorization": f"Bearer {ADMIN}"}),
                (f"{proxy.url}/metrics", good),
            ]
            for url, headers in attempts:
                async with session.get(url, headers={"Accept": MANIFEST_ACCEPT, **headers}) as resp:
                    await resp.read()
            # Bytes that are not UTF-8, and a header near aiohttp's limit, byte for byte.
            port = proxy.server.port
            assert port is not None
            await raw_request(
                port, "GET /admin/v1/images HTTP/1.1", {"Authorization": f"Bearer {ADMIN}\u00e9\u2603"}
            )
            await raw_request(port, "GET /v2/ HTTP/1.1", {"Authorization": "Bearer " + ADMIN * 200})
    finally:
        configure("warning", "console")
    out = capsys.readouterr()
    logged = out.err + out.out
    assert '"event": "request"' in logged and '"event": "upstream_failed"' in logged
    secrets = [
        PASSWORD,
        b64(f"{USER}:{PASSWORD}"),
        STATIC,
        ADMIN,
        b64("admin:" + ADMIN),
        UPSTREAM_PASSWORD,
        b64(f"{UPSTREAM_USER}:{UPSTREAM_PASSWORD}"),
        *issued,
    ]
    for secret in secrets:
        assert secret not in logged, secret
    # No header logged by name either ("Authorization header too long" is a reason, not one).
    assert '"authorization":' not in logged.lower()
