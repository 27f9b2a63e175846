"""Real clients log in to ocicache: skopeo (--src-creds, auth.json as podman and CRI-O keep
it), containerd's ctr (an Authorization header in hosts.toml, and --user through the token
endpoint) and Docker 20.10 (docker login PROXY, and what it sends to a registry-mirrors entry).

The upstreams are real docker-registry processes; the proxy runs in-process with auth: from
the settings parser, its htpasswd made by the real htpasswd -B. Each client has its outside
access blackholed (see dockerd.py), so a client that gave up on the proxy and went to the real
registry fails instead of succeeding behind the test's back.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.core.authconfig import parse_auth
from tests.conftest import Proxy, StartProxy
from tests.support.containerd import Containerd
from tests.support.dockerd import Blackhole, offline_env
from tests.support.images import Image, make_image, push_image
from tests.support.layout import layout_blobs
from tests.support.registry import Registry
from tests.system.test_clients import (
    HOST_ARCH,
    ProxyLog,
    blocking,
    ctr_pull,
    docker,
    dockerd_with,
    image_id,
    run_tool,
    setup_file,
    write_hosts,
)

USERS = {"ci": "ci-pass-7f3a9c", "dev": "dev-pass-2b8e41"}
TOKENS = {"robot": "robot-tok-5d1f0e9a8b7c6d5e"}
RULES = [
    {"anonymous": True, "upstreams": ["docker.io"]},
    {"users": ["ci", "robot"], "upstreams": ["internal"]},
]


def basic_value(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class World:
    proxy: Proxy
    hub: Registry
    internal: Registry
    hub_image: Image
    internal_image: Image
    session: aiohttp.ClientSession

    async def upstream_paths(self, registry: Registry) -> list[str]:
        """Paths the registry was asked for, once it has logged a marker sent after them."""
        marker = f"/v2/ocicache-test/marker/manifests/m{uuid.uuid4().hex}"
        async with self.session.head(registry.url + marker) as resp:
            assert resp.status == 404
        reqs = await blocking(registry.wait_for_requests, lambda rs: any(r.path == marker for r in rs))
        return [r.path for r in reqs if "/ocicache-test/marker/" not in r.path]


@pytest.fixture
async def world(
    start_proxy: StartProxy,
    registry: Registry,
    registry2: Registry,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> AsyncIterator[Any]:
    hub_image = make_image(layer_sizes=(4096, 30_000), arch=HOST_ARCH, seed=1301)
    internal_image = make_image(layer_sizes=(2048,), arch=HOST_ARCH, seed=1302)
    await push_image(session, registry.url, "library/app", hub_image, tag="v1")
    await push_image(session, registry2.url, "team/app", internal_image, tag="v1")
    htpasswd = tmp_path / "htpasswd"
    lines = [
        subprocess.run(
            ["htpasswd", "-nbB", user, password], check=True, capture_output=True, text=True
        ).stdout.strip()
        for user, password in USERS.items()
    ]
    htpasswd.write_text("\n".join(lines) + "\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{u}:{t}\n" for u, t in TOKENS.items()))

    async def start(**spec: Any) -> World:
        auth = parse_auth("auth", {"htpasswd": str(htpasswd), "tokens_file": str(tokens), **spec})
        proxy = await start_proxy({"docker.io": registry.url, "internal": registry2.url}, auth=auth)
        return World(proxy, registry, registry2, hub_image, internal_image, session)

    yield start


def check_layout(layout: Path, image: Image) -> None:
    blobs = layout_blobs(layout)
    assert blobs[image.manifest_digest] == image.manifest
    for blob in image.blobs:
        assert blobs[blob.digest] == blob.data


async def skopeo(*args: str) -> tuple[int, str]:
    blackhole = Blackhole()
    try:
        return await run_tool("skopeo", *args, env=offline_env(blackhole))
    finally:
        blackhole.close()


# --- skopeo, podman, CRI-O -----------------------------------------------------------------


async def test_skopeo_src_creds(world: Any, tmp_path: Path) -> None:
    w: World = await world(rules=RULES, anonymous=True)
    src = f"docker://{w.proxy.host}/internal/team/app:v1"
    code, out = await skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", f"ci:{USERS['ci']}", src, f"oci:{tmp_path / 'ok'}"
    )
    assert code == 0, out
    check_layout(tmp_path / "ok", w.internal_image)
    fetched = await w.upstream_paths(w.internal)

    # A wrong password, another user the rules do not let in, and nobody: refused before
    # anything goes upstream.
    for creds in (["--src-creds", "ci:wrong"], ["--src-creds", f"dev:{USERS['dev']}"], ["--src-no-creds"]):
        code, out = await skopeo("copy", "--src-tls-verify=false", *creds, src, f"oci:{tmp_path / 'no'}")
        assert code != 0
        assert "unauthorized" in out.lower() or "denied" in out.lower(), out
    assert await w.upstream_paths(w.internal) == fetched


async def test_auth_json_as_podman_and_crio_keep_it(world: Any, tmp_path: Path) -> None:
    w: World = await world()  # anonymous off
    auth_json = tmp_path / "auth.json"
    auth_json.write_text(json.dumps({"auths": {w.proxy.host: {"auth": basic_value("ci", USERS["ci"])}}}))
    conf = tmp_path / "registries.conf"
    conf.write_text(await setup_file(w.session, w.proxy, "registries.conf"))

    # Named at the proxy, and through registries.conf's mirror (how CRI-O pulls docker.io/...):
    # containers/image looks the mirror's credentials up under its host in auth.json.
    for n, ref in enumerate(
        (f"docker://{w.proxy.host}/docker.io/library/app:v1", "docker://docker.io/library/app:v1")
    ):
        layout = tmp_path / f"l{n}"
        code, out = await skopeo(
            "copy",
            "--src-tls-verify=false",
            "--registries-conf",
            str(conf),
            "--authfile",
            str(auth_json),
            ref,
            f"oci:{layout}",
        )
        assert code == 0, out
        check_layout(layout, w.hub_image)

    # Without it the mirror refuses, and the fallback to docker.io itself is blackholed.
    empty = tmp_path / "empty.json"
    empty.write_text('{"auths": {}}')
    code, out = await skopeo(
        "copy",
        "--registries-conf",
        str(conf),
        "--authfile",
        str(empty),
        "docker://docker.io/library/app:v1",
        f"oci:{tmp_path / 'none'}",
    )
    assert code != 0, out


# --- containerd ----------------------------------------------------------------------------


async def test_containerd_hosts_toml_with_an_authorization_header(
    world: Any, containerd: Containerd, proxy_log: ProxyLog, tmp_path: Path
) -> None:
    w: World = await world()  # anonymous off
    ref = "docker.io/library/app:v1"
    hosts = tmp_path / "hosts"
    await write_hosts(w.session, w.proxy, hosts, "docker.io")
    plain = (hosts / "docker.io" / "hosts.toml").read_text()

    # Without a header ctr gets a 401 from the proxy and then tries Docker Hub, blackholed.
    out = await ctr_pull(containerd, ref, hosts, check=False)
    assert "proxyconnect" in out or "401" in out, out
    await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1", status=401)

    for header in (f"Bearer {TOKENS['robot']}", f"Basic {basic_value('ci', USERS['ci'])}"):
        (hosts / "docker.io" / "hosts.toml").write_text(
            plain + f'\n[host."{w.proxy.url}".header]\n  Authorization = "{header}"\n'
        )
        await ctr_pull(containerd, ref, hosts)
        assert await blocking(containerd.image_target, ref) == w.hub_image.manifest_digest
        await blocking(containerd.ctr, "images", "rm", "--sync", ref)

    # ctr --user: containerd follows the challenge to the token endpoint (the OAuth2 POST).
    (hosts / "docker.io" / "hosts.toml").write_text(plain)
    mark = len(proxy_log.served)
    res = await blocking(
        containerd.ctr,
        "images",
        "pull",
        "--hosts-dir",
        str(hosts),
        "--user",
        f"ci:{USERS['ci']}",
        ref,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    token_calls = [s for s in proxy_log.since(mark) if s.path == "/auth/token"]
    assert token_calls and all(s.status == 200 for s in token_calls), token_calls


# --- Docker --------------------------------------------------------------------------------


async def test_docker_login_then_pull(world: Any, proxy_log: ProxyLog, tmp_path: Path) -> None:
    w: World = await world(rules=RULES, anonymous=True)
    async with dockerd_with(tmp_path / "docker", {}) as daemon:
        bad = await blocking(
            daemon.docker, "login", "-u", "ci", "-p", "wrong", w.proxy.host, check=False, timeout=120
        )
        assert bad.returncode != 0 and "unauthorized" in bad.stderr.lower(), bad.stderr
        await docker(daemon, "login", "-u", "ci", "-p", USERS["ci"], w.proxy.host)
        saved = json.loads((daemon.docker_config / "config.json").read_text())
        assert saved["auths"][w.proxy.host]["auth"] == basic_value("ci", USERS["ci"])

        ref = f"{w.proxy.host}/internal/team/app:v1"
        await docker(daemon, "pull", ref)
        assert await image_id(daemon, ref) == w.internal_image.config.digest
        await proxy_log.saw("GET", "/v2/", status=401)  # where Docker learns the realm
        await proxy_log.saw("GET", "/auth/token")
        for blob in w.internal_image.blobs:
            await proxy_log.saw("GET", f"/v2/internal/team/app/blobs/{blob.digest}")

        # Logged out, the rules leave docker.io open and close internal.
        await docker(daemon, "logout", w.proxy.host)
        await docker(daemon, "pull", f"{w.proxy.host}/library/app:v1")
        await docker(daemon, "rmi", ref)
        fetched = await w.upstream_paths(w.internal)
        refused = await blocking(daemon.docker, "pull", ref, check=False, timeout=120)
        assert refused.returncode != 0
        assert await w.upstream_paths(w.internal) == fetched


async def test_what_docker_sends_to_a_registry_mirror(
    world: Any, proxy_log: ProxyLog, tmp_path: Path
) -> None:
    """dockerd 20.10 pulls Docker Hub names from a mirror with Docker Hub's credentials (the
    CLI's auths["https://index.docker.io/v1/"]), never with the mirror's own (auths["PROXY"]
    from docker login PROXY). A mirror that refuses it is skipped for Docker Hub itself."""
    w: World = await world()  # anonymous off
    daemon_json = json.loads(await setup_file(w.session, w.proxy, "docker"))
    async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
        config = daemon.docker_config / "config.json"

        # No credentials: the mirror says 401, and dockerd goes to Docker Hub (blackholed).
        before = await w.upstream_paths(w.hub)
        out = await blocking(daemon.docker, "pull", "app:v1", check=False, timeout=120)
        assert out.returncode != 0
        assert "registry-1.docker.io" in out.stderr and "proxyconnect" in out.stderr, out.stderr
        await proxy_log.saw("GET", "/v2/", status=401)
        assert await w.upstream_paths(w.hub) == before

        # docker login PROXY is for PROXY/... names only: the mirror still gets nothing.
        await docker(daemon, "login", "-u", "ci", "-p", USERS["ci"], w.proxy.host)
        out = await blocking(daemon.docker, "pull", "app:v1", check=False, timeout=120)
        assert out.returncode != 0 and "registry-1.docker.io" in out.stderr, out.stderr

        # Docker Hub's entry is what reaches the mirror, at the token endpoint.
        config.write_text(
            json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": basic_value("ci", USERS["ci"])}}})
        )
        mark = len(proxy_log.served)
        await docker(daemon, "pull", "app:v1")
        assert await image_id(daemon, "app:v1") == w.hub_image.config.digest
        served = proxy_log.since(mark)
        assert any(s.path == "/auth/token" and s.status == 200 for s in served), served
        assert all(s.status in (200, 401) for s in served), served


async def test_docker_mirror_with_anonymous_pulls(world: Any, proxy_log: ProxyLog, tmp_path: Path) -> None:
    w: World = await world(anonymous=True, rules=RULES)
    daemon_json = json.loads(await setup_file(w.session, w.proxy, "docker"))
    async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
        await docker(daemon, "pull", "app:v1")
        assert await image_id(daemon, "app:v1") == w.hub_image.config.digest
        # An anonymous token from the realm, then the pull with it.
        await proxy_log.saw("GET", "/auth/token")
        await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1")
