"""Client authentication and auth.rules through the live app, against fake upstreams.

What every refusal must show: the status and OCI code, a challenge where logging in could
help, and no request upstream (the fake upstreams log every request they get).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from proxy.cli.logs import configure
from proxy.core.authconfig import parse_auth
from proxy.web import keys
from proxy.web.guard import Guard
from proxy.web.workerlink import REPORT_PATH
from tests.conftest import Proxy, StartProxy, raw_request
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image
from tests.support.rawhttp import read_response

PASSWORDS = {"ci": "ci-s3cret-pw", "dev": "dev-s3cret-pw"}
STATIC = {"robot": "robot-token-0123456789abcdef"}
ACCEPT = {"Accept": MANIFEST_ACCEPT}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_htpasswd(path: Path, passwords: dict[str, str]) -> None:
    # Cost 4, the lowest bcrypt allows: these tests are about the flow, not the hash.
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}" for u, p in passwords.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Setup:
    proxy: Proxy
    hub: FakeUpstream
    internal: FakeUpstream
    htpasswd: Path
    session: aiohttp.ClientSession

    @property
    def guard(self) -> Guard:
        return self.proxy.app[keys.GUARD]

    def manifest_url(self, name: str = "library/app", ns: str | None = None) -> str:
        return f"{self.proxy.url}/v2/{name}/manifests/v1" + (f"?ns={ns}" if ns else "")

    async def get(self, url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        async with self.session.get(url, headers={**ACCEPT, **(headers or {})}) as resp:
            body = await resp.read()
            try:
                doc = json.loads(body)
            except ValueError:
                doc = body
            return resp.status, doc, dict(resp.headers)

    async def token(self, headers: dict[str, str] | None = None) -> str:
        status, doc, _ = await self.get(f"{self.proxy.url}/auth/token?service=ocicache", headers)
        assert status == 200, doc
        assert doc["token"] == doc["access_token"] and doc["expires_in"] == 300
        return str(doc["token"])

    def upstream_requests(self) -> int:
        return len(self.hub.seen) + len(self.internal.seen)


StartAuth = Any  # a callable: (**auth spec) -> Setup


@pytest.fixture
async def start_auth(
    start_proxy: StartProxy, tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[StartAuth]:
    async with FakeUpstream() as hub, FakeUpstream() as internal:
        image = make_image(layer_sizes=(1024,), seed=900)
        hub.add_image("library/app", image, tag="v1")
        internal.add_image("team/app", image, tag="v1")
        internal.add_image("team/secret", image, tag="v1")
        internal.add_image("public/base", image, tag="v1")
        htpasswd = tmp_path / "htpasswd"
        write_htpasswd(htpasswd, PASSWORDS)
        tokens = tmp_path / "tokens"
        tokens.write_text("".join(f"{u}:{t}\n" for u, t in STATIC.items()))

        started: list[Setup] = []

        async def start(**spec: Any) -> Setup:
            spec = {"htpasswd": str(htpasswd), "tokens_file": str(tokens), **spec}
            spec = {k: v for k, v in spec.items() if v is not None}
            auth = parse_auth("auth", spec)
            proxy = await start_proxy(
                {"docker.io": hub.url, "internal": internal.url},
                auth=auth,
                cache_dir=tmp_path / f"cache{len(started)}",  # one serving process per cache
            )
            started.append(Setup(proxy, hub, internal, htpasswd, session))
            return started[-1]

        yield start


RULES = [
    {"anonymous": True, "upstreams": ["docker.io"]},
    {"users": ["ci"], "upstreams": ["internal"], "repositories": ["team/secret"], "deny": True},
    {"users": ["ci", "robot"], "upstreams": ["internal"]},
    {"users": ["*"], "upstreams": ["internal"], "repositories": ["public/*"]},
]


# --- who is asking -------------------------------------------------------------------------


async def test_without_credentials_the_base_and_the_api_challenge(start_auth: StartAuth) -> None:
    s = await start_auth()
    for url in (f"{s.proxy.url}/v2/", s.manifest_url()):
        status, doc, headers = await s.get(url)
        assert status == 401
        assert doc["errors"][0]["code"] == "UNAUTHORIZED"
        assert headers["WWW-Authenticate"] == (
            f'Bearer realm="http://{s.proxy.host}/auth/token",service="ocicache"'
        )
    assert s.upstream_requests() == 0


async def test_basic_static_and_issued_tokens_pull(start_auth: StartAuth) -> None:
    s = await start_auth()
    assert (await s.get(f"{s.proxy.url}/v2/", basic("ci", PASSWORDS["ci"])))[0] == 200
    assert (await s.get(s.manifest_url(), basic("ci", PASSWORDS["ci"])))[0] == 200
    assert (await s.get(s.manifest_url(), bearer(STATIC["robot"])))[0] == 200
    token = await s.token(basic("dev", PASSWORDS["dev"]))
    assert (await s.get(s.manifest_url(), bearer(token)))[0] == 200
    assert (await s.get(f"{s.proxy.url}/v2/", bearer(token)))[0] == 200
    # A static token may be traded for an issued one; an issued one may not be renewed.
    assert await s.token(bearer(STATIC["robot"]))
    status, _, _ = await s.get(f"{s.proxy.url}/auth/token", bearer(token))
    assert status == 401


async def test_the_oauth2_password_grant(start_auth: StartAuth) -> None:
    s = await start_auth()
    form = {"grant_type": "password", "username": "ci", "password": PASSWORDS["ci"], "service": "ocicache"}
    async with s.session.post(f"{s.proxy.url}/auth/token", data=form) as resp:
        assert resp.status == 200
        token = (await resp.json())["access_token"]
    assert (await s.get(s.manifest_url(), bearer(token)))[0] == 200
    async with s.session.post(f"{s.proxy.url}/auth/token", data={**form, "password": "wrong"}) as resp:
        assert resp.status == 401
    async with s.session.post(
        f"{s.proxy.url}/auth/token", data={"grant_type": "refresh_token", "refresh_token": "x"}
    ) as resp:
        assert resp.status == 405  # containerd then falls back to GET


BAD_CREDENTIALS = [
    basic("ci", "wrong"),
    basic("nobody", PASSWORDS["ci"]),
    basic("ci", PASSWORDS["dev"]),
    basic("ci", ""),
    basic("", PASSWORDS["ci"]),
    {"Authorization": "Basic " + base64.b64encode(b"ci" + PASSWORDS["ci"].encode()).decode()},  # no colon
    {"Authorization": "Basic !!!"},
    {"Authorization": "Digest username=ci"},
    {"Authorization": "Bearer not-a-known-token-at-all"},
    {"Authorization": "Bearer ocq1.e30.AAAA"},  # shaped like ours, not signed by us
    {"Authorization": "Basic " + "QUFB" * 1100},  # 4.4 KB: past our limit, within aiohttp's
]


@pytest.mark.parametrize("headers", BAD_CREDENTIALS, ids=range(len(BAD_CREDENTIALS)))
async def test_bad_credentials_get_401_and_reach_nothing(
    start_auth: StartAuth, headers: dict[str, str]
) -> None:
    s = await start_auth(anonymous=True, rules=RULES)
    status, doc, resp_headers = await s.get(s.manifest_url(), headers)
    assert status == 401
    assert doc["errors"][0]["code"] == "UNAUTHORIZED"
    assert resp_headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert s.upstream_requests() == 0
    # Anonymous, the same pull is allowed by the first rule: bad credentials are not "none".
    assert (await s.get(s.manifest_url()))[0] == 200


async def test_hostile_header_bytes(start_auth: StartAuth) -> None:
    s = await start_auth()
    port = s.proxy.server.port or 0
    # Not UTF-8 at all, in the header itself (aiohttp passes such bytes on as surrogates).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic \xff\xfe\xfd\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert data.startswith(b"HTTP/1.1 401"), data[:100]
    # Two Authorization headers: which would we believe? Neither.
    good = basic("ci", PASSWORDS["ci"])["Authorization"]
    status, _ = await raw_request(port, "GET /v2/ HTTP/1.1", {"Authorization": good, "authorization": good})
    assert status == 401
    # Larger than aiohttp reads for one header: its own 400, and the proxy serves on.
    status, _ = await raw_request(port, "GET /v2/ HTTP/1.1", {"Authorization": "Basic " + "A" * 9000})
    assert status == 400
    assert (await s.get(f"{s.proxy.url}/v2/", basic("ci", PASSWORDS["ci"])))[0] == 200


async def test_anonymous_basic_from_containers_image_is_anonymous(start_auth: StartAuth) -> None:
    s = await start_auth(anonymous=True, rules=RULES)
    assert (await s.get(s.manifest_url(), basic("", "")))[0] == 200
    s2 = await start_auth()
    assert (await s2.get(s2.manifest_url(), basic("", "")))[0] == 401


async def test_anonymous_tokens(start_auth: StartAuth) -> None:
    s = await start_auth(anonymous=True)
    # The base endpoint still challenges (Docker learns the realm there)...
    assert (await s.get(f"{s.proxy.url}/v2/"))[0] == 401
    # ...and the realm hands out an anonymous token, which pulls.
    token = await s.token()
    assert (await s.get(f"{s.proxy.url}/v2/", bearer(token)))[0] == 200
    assert (await s.get(s.manifest_url(), bearer(token)))[0] == 200
    assert (await s.get(s.manifest_url()))[0] == 200
    closed = await start_auth(anonymous=False)
    status, _, _ = await closed.get(f"{closed.proxy.url}/auth/token")
    assert status == 401


# --- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "name", "ns", "status"),
    [
        (None, "library/app", None, 200),
        (None, "app", None, 200),  # docker.io's library/ added before the rules look
        (None, "internal/team/app", None, 401),  # logging in could help: a challenge
        (None, "team/app", "internal", 401),
        ("ci", "internal/team/app", None, 200),
        ("ci", "team/app", "internal", 200),
        ("ci", "internal/team/secret", None, 403),  # a deny rule comes first
        ("robot", "internal/team/app", None, 200),
        ("dev", "internal/team/app", None, 403),  # logged in, and still not allowed
        ("dev", "internal/public/base", None, 200),
        ("ci", "library/app", None, 200),  # anonymous: true covers logged-in users
    ],
)
async def test_rules(start_auth: StartAuth, who: str | None, name: str, ns: str | None, status: int) -> None:
    s = await start_auth(anonymous=True, rules=RULES)
    headers = {} if who is None else bearer(STATIC[who]) if who in STATIC else basic(who, PASSWORDS[who])
    got, doc, resp_headers = await s.get(s.manifest_url(name, ns), headers)
    assert got == status, doc
    if status == 401:
        assert doc["errors"][0]["code"] == "UNAUTHORIZED"
        assert f'scope="repository:{name}:pull"' in resp_headers["WWW-Authenticate"]
    if status == 403:
        assert doc["errors"][0]["code"] == "DENIED"
        assert "WWW-Authenticate" not in resp_headers
    if status != 200:
        # A refused pull asks no upstream anything.
        assert s.upstream_requests() == 0


async def test_one_users_token_does_not_open_anothers_rule(start_auth: StartAuth) -> None:
    s = await start_auth(anonymous=True, rules=RULES)
    dev_token = await s.token(basic("dev", PASSWORDS["dev"]))
    for url in (s.manifest_url("internal/team/app"), f"{s.proxy.url}/v2/internal/team/app/tags/list"):
        status, doc, _ = await s.get(url, bearer(dev_token))
        assert status == 403 and doc["errors"][0]["code"] == "DENIED"
    assert s.upstream_requests() == 0
    # A token names its user; asking for ci's scope with dev's password changes nothing.
    status, doc, _ = await s.get(
        f"{s.proxy.url}/auth/token?scope=repository:internal/team/app:pull&account=ci",
        basic("dev", PASSWORDS["dev"]),
    )
    assert status == 200
    assert (await s.get(s.manifest_url("internal/team/app"), bearer(doc["token"])))[0] == 403


async def test_blobs_and_tags_are_held_to_the_rules_too(start_auth: StartAuth) -> None:
    s = await start_auth(anonymous=True, rules=RULES)
    digest = "sha256:" + "a" * 64
    for path in (f"/v2/internal/team/app/blobs/{digest}", "/v2/internal/team/app/tags/list"):
        status, _, _ = await s.get(s.proxy.url + path, basic("dev", PASSWORDS["dev"]))
        assert status == 403
        async with s.session.head(s.proxy.url + path, headers=basic("dev", PASSWORDS["dev"])) as resp:
            assert resp.status == 403
    assert s.upstream_requests() == 0


async def test_rules_without_logins_limit_anonymous_clients(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path
) -> None:
    auth = parse_auth("auth", {"rules": [{"anonymous": True, "upstreams": ["docker.io"]}]})
    async with FakeUpstream() as other:
        proxy = await start_proxy({"docker.io": fake.url, "other": other.url}, auth=auth)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.url}/v2/") as resp:
                assert resp.status == 200  # nobody can log in: nothing to challenge for
            async with session.get(f"{proxy.url}/v2/other/x/manifests/v1") as resp:
                assert resp.status == 403
                assert "WWW-Authenticate" not in resp.headers
        assert other.seen == []


async def test_public_routes_and_everything_else(start_auth: StartAuth) -> None:
    s = await start_auth()
    for path in (
        "/setup/docker",
        "/setup/containerd?registry=docker.io",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
    ):
        assert (await s.get(s.proxy.url + path))[0] == 200, path
    # Every other route the app has wants a login first, the catch-all too.
    for path in ("/v2/", "/v2/library/app/manifests/v1", "/v2/library/app/tags/list", "/nothing/here"):
        assert (await s.get(s.proxy.url + path))[0] == 401, path
    # The status page is public: what it shows under rules is tested with the page.
    public = {"/setup/{client}", "/healthz", "/readyz", "/metrics", "/auth/token", "/"}
    if s.proxy.settings.processes > 1:
        # Front workers report their counts here; it answers nobody else (workerlink).
        public.add(REPORT_PATH)
        async with s.session.post(s.proxy.url + REPORT_PATH, data=b"{}") as resp:
            assert resp.status == 404
    protected = {"/v2/", "/v2/{tail}", "/{tail}"}
    assert {r.canonical for r in s.proxy.app.router.resources()} == public | protected


# --- cost and limits -----------------------------------------------------------------------


async def test_a_verified_login_costs_no_more_bcrypt(
    start_auth: StartAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await start_auth()
    calls: list[str] = []
    original = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(threading.current_thread().name)
        return original(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    headers = basic("ci", PASSWORDS["ci"])
    # Many requests at once with one new credential: one check between them.
    results = await asyncio.gather(*(s.get(s.manifest_url(), headers) for _ in range(20)))
    assert {r[0] for r in results} == {200}
    assert len(calls) == 1
    for _ in range(20):
        assert (await s.get(s.manifest_url(), headers))[0] == 200
    assert len(calls) == 1
    # bcrypt ran on the guard's own threads, not in the default executor that file I/O uses.
    assert calls[0].startswith("ocicache-auth")
    # An issued token is verified (base64, JSON, HMAC) once, then looked up.
    token = await s.token(headers)
    verified: list[str] = []
    verify = s.guard.signer.verify

    def counting_verify(token: str) -> Any:
        verified.append(token)
        return verify(token)

    monkeypatch.setattr(s.guard.signer, "verify", counting_verify)
    for _ in range(10):
        assert (await s.get(s.manifest_url(), bearer(token)))[0] == 200
    assert len(verified) == 1


async def test_failed_attempts_are_limited_per_address(start_auth: StartAuth) -> None:
    s = await start_auth(max_failures=3, failure_window="1h")
    ci_token = await s.token(basic("ci", PASSWORDS["ci"]))
    # Verified once, so remembered: the cache must not answer for an address out of attempts.
    assert (await s.get(f"{s.proxy.url}/v2/", basic("ci", PASSWORDS["ci"])))[0] == 200
    for _ in range(3):
        assert (await s.get(s.manifest_url(), basic("ci", "guess")))[0] == 401
    # Out of attempts: even the right password waits, and says how long.
    status, doc, headers = await s.get(s.manifest_url(), basic("ci", PASSWORDS["ci"]))
    assert status == 429 and doc["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 3000 < int(headers["Retry-After"]) <= 3600
    assert (await s.get(s.manifest_url(), bearer(STATIC["robot"])))[0] == 429
    # A token the proxy issued cannot be guessed, so it still works from there.
    assert (await s.get(s.manifest_url(), bearer(ci_token)))[0] == 200
    # Another address is not held back (127.0.0.2 is loopback too).
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        async with other.get(s.manifest_url(), headers={**ACCEPT, **basic("ci", PASSWORDS["ci"])}) as resp:
            assert resp.status == 200
    assert s.upstream_requests() == 1  # the one manifest fetch; the blocked ones reached nothing


async def test_a_burst_of_guesses_cannot_outrun_the_limit(start_auth: StartAuth) -> None:
    s = await start_auth(max_failures=5, failure_window="1h")
    results = await asyncio.gather(*(s.get(s.manifest_url(), basic("ci", f"guess{i}")) for i in range(40)))
    statuses = [r[0] for r in results]
    assert statuses.count(401) <= 5
    assert statuses.count(429) >= 35


async def test_successes_do_not_reset_the_count(start_auth: StartAuth) -> None:
    s = await start_auth(max_failures=3, failure_window="1h")
    for i in range(3):
        assert (await s.get(s.manifest_url(), basic("dev", f"guess{i}")))[0] == 401
        # A valid login between guesses (a different credential each time: no cache hit).
        write_htpasswd(s.htpasswd, {**PASSWORDS, f"u{i}": "pw"})
        assert (await s.get(s.manifest_url(), basic(f"u{i}", "pw")))[0] in (200, 429)
    assert (await s.get(s.manifest_url(), basic("dev", PASSWORDS["dev"])))[0] == 429


# --- reloading -----------------------------------------------------------------------------


async def test_a_user_added_to_the_file_can_log_in_at_once(start_auth: StartAuth) -> None:
    s = await start_auth()
    assert (await s.get(s.manifest_url(), basic("new", "new-pw")))[0] == 401
    write_htpasswd(s.htpasswd, {**PASSWORDS, "new": "new-pw"})
    assert (await s.get(s.manifest_url(), basic("new", "new-pw")))[0] == 200


async def test_removed_users_and_changed_passwords_end_sessions(start_auth: StartAuth) -> None:
    s = await start_auth()
    dev, ci = basic("dev", PASSWORDS["dev"]), basic("ci", PASSWORDS["ci"])
    dev_token = await s.token(dev)
    ci_token = await s.token(ci)
    assert (await s.get(s.manifest_url(), dev))[0] == 200
    generation = s.guard.generation
    write_htpasswd(s.htpasswd, {"ci": "a-new-password"})
    await asyncio.wait_for(s.guard.changed(generation), 30)  # the watcher saw the file change
    assert (await s.get(s.manifest_url(), dev))[0] == 401  # the cached login is gone
    assert (await s.get(s.manifest_url(), bearer(dev_token)))[0] == 401
    assert (await s.get(s.manifest_url(), bearer(ci_token)))[0] == 401  # password changed
    assert (await s.get(s.manifest_url(), ci))[0] == 401
    assert (await s.get(s.manifest_url(), basic("ci", "a-new-password")))[0] == 200


async def test_a_broken_file_keeps_the_last_good_accounts(start_auth: StartAuth) -> None:
    s = await start_auth()
    ci = basic("ci", PASSWORDS["ci"])
    generation = s.guard.generation
    s.htpasswd.write_text("ci:$apr1$not$bcrypt\n")
    assert not await s.guard.reload()
    assert s.guard.generation == generation
    assert (await s.get(s.manifest_url(), ci))[0] == 200
    s.htpasswd.unlink()
    assert not await s.guard.reload()
    assert (await s.get(s.manifest_url(), ci))[0] == 200


# --- logs ----------------------------------------------------------------------------------


async def test_no_credential_reaches_a_log(start_auth: StartAuth, capsys: pytest.CaptureFixture[str]) -> None:
    configure("debug", "json")
    try:
        s = await start_auth(anonymous=True, rules=RULES, max_failures=100)
        token = await s.token(basic("ci", PASSWORDS["ci"]))
        secrets = [*PASSWORDS.values(), *STATIC.values(), token, "guessed-password"]
        sent = [
            basic("ci", PASSWORDS["ci"]),
            basic("dev", "guessed-password"),
            bearer(STATIC["robot"]),
            bearer(token),
            {"Authorization": "Basic " + base64.b64encode(b"nocolon-guessed-password").decode()},
        ]
        for headers in sent:
            await s.get(s.manifest_url("internal/team/app"), headers)
        form = {"grant_type": "password", "username": "dev", "password": "guessed-password"}
        async with s.session.post(f"{s.proxy.url}/auth/token", data=form):
            pass
    finally:
        configure("warning", "console")
    out = capsys.readouterr()
    logged = out.out + out.err
    assert '"user": "ci"' in logged  # the user name is logged once verified...
    for secret in secrets:  # ...never a secret, in any encoding a header carries it
        assert secret not in logged
        assert base64.b64encode(secret.encode()).decode()[:12] not in logged
    for headers in sent:
        assert headers["Authorization"].split(" ", 1)[1] not in logged


async def test_a_hostile_host_header_cannot_bend_the_challenge(start_auth: StartAuth) -> None:
    s = await start_auth()
    port = s.proxy.server.port or 0
    for host in ('evil.example"/auth/token,realm="x', "a b", "127.0.0.1:99999"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert data.startswith(b"HTTP/1.1 401")
        challenge = [line for line in data.split(b"\r\n") if line.lower().startswith(b"www-authenticate:")]
        assert challenge == [
            f'WWW-Authenticate: Bearer realm="http://127.0.0.1:{port}/auth/token",service="ocicache"'.encode()
        ]


async def test_hostile_token_requests(start_auth: StartAuth) -> None:
    s = await start_auth(max_failures=100)
    url = f"{s.proxy.url}/auth/token"
    for body, content_type in (
        (b"grant_type=password&username=ci&password=\xff\xfe", "application/x-www-form-urlencoded"),
        (b"\xff" * 1000, "application/x-www-form-urlencoded"),
        (b"grant_type=password&username=&password=x", "application/x-www-form-urlencoded"),
        (b"grant_type=password&username=ci", "application/x-www-form-urlencoded"),
        (b"x" * 70_000, "application/x-www-form-urlencoded"),  # past the body limit
        (b'{"username": "ci"}', "application/json"),
    ):
        async with s.session.post(url, data=body, headers={"Content-Type": content_type}) as resp:
            assert 400 <= resp.status < 500, (body[:40], resp.status)
    for method in ("PUT", "DELETE"):
        async with s.session.request(method, url) as resp:
            assert resp.status == 405
    assert (await s.get(s.manifest_url(), basic("ci", PASSWORDS["ci"])))[0] == 200


async def test_a_token_request_body_trickled_past_the_header_timeout_is_408(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, PASSWORDS)
    auth = parse_auth("auth", {"htpasswd": str(htpasswd)})
    proxy = await start_proxy({"docker.io": "http://127.0.0.1:9"}, auth=auth, header_timeout=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port or 0)
    try:
        # A whole head promising a body that never comes whole: the handler reading it would
        # otherwise wait for as long as the client likes.
        writer.write(
            b"POST /auth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\ngrant_type=pass"
        )
        async with asyncio.timeout(30):
            resp = await read_response(reader)
    finally:
        writer.close()
    assert resp is not None and resp.status == 408 and resp.closes
    assert resp.oci_error_codes() == ["REQUEST_TIMEOUT"]
