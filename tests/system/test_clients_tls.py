"""Real clients over HTTPS, with certificates made per test (tests/support/certs.py): skopeo
with --src-cert-dir, ctr with ``ca`` and ``client`` in hosts.toml, dockerd with certs.d; client
certificates from the right CA and from another; and a SIGHUP reload in a real process.

dockerd treats every registry in 127.0.0.0/8 as insecure: it skips verification there and
reads no certs.d at all, so a test on 127.0.0.1 would prove nothing about certs.d. Its dockerd
therefore reaches the proxy at [::1], which is loopback too but not in that range.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy.core.authconfig import TlsConfig
from proxy.web import tls
from proxy.web.app import create_app
from tests.conftest import Proxy, StartProxy, make_settings
from tests.support.certs import Pki, make_pki
from tests.support.containerd import Containerd
from tests.support.dockerd import Blackhole, offline_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_image, push_image
from tests.support.layout import layout_blobs
from tests.support.proxyproc import serving
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
)

DOCKER_CERTS_D = Path("/etc/docker/certs.d")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


async def tls_proxy(
    start_proxy: StartProxy, registry: Registry, pki: Pki, *, mtls: bool, cache_dir: Path | None = None
) -> Proxy:
    cfg = TlsConfig(pki.server.cert, pki.server.key, client_ca=pki.ca if mtls else None)
    return await start_proxy(
        {"docker.io": registry.url}, tls=cfg, ssl_context=tls.server_context(cfg), cache_dir=cache_dir
    )


def cert_dir(path: Path, pki: Pki, client: bool | str = False) -> Path:
    """containers/image's layout: *.crt are CAs, a *.cert with its *.key a client certificate."""
    path.mkdir(parents=True)
    shutil.copy(pki.ca, path / "ca.crt")
    if client:
        pair = pki.foreign_client if client == "foreign" else pki.client
        shutil.copy(pair.cert, path / "client.cert")
        shutil.copy(pair.key, path / "client.key")
    return path


async def skopeo_copy(ref: str, dest: Path, *args: str) -> tuple[int, str]:
    blackhole = Blackhole()
    try:
        argv = ["skopeo", "copy", *args, f"docker://{ref}", f"oci:{dest}"]
        return await run_tool(*argv, env=offline_env(blackhole))
    finally:
        blackhole.close()


async def test_skopeo_over_https_and_mtls(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession, pki: Pki, tmp_path: Path
) -> None:
    image = make_image(layer_sizes=(4096,), seed=1401)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    proxy = await tls_proxy(start_proxy, registry, pki, mtls=False)
    ref = f"{proxy.host}/library/app:v1"
    code, out = await skopeo_copy(ref, tmp_path / "a", "--src-cert-dir", str(cert_dir(tmp_path / "c1", pki)))
    assert code == 0, out
    assert layout_blobs(tmp_path / "a")[image.manifest_digest] == image.manifest
    # Verification is on: without our CA the certificate is unknown.
    code, out = await skopeo_copy(ref, tmp_path / "b")
    assert code != 0 and "certificate" in out, out

    proxy = await tls_proxy(start_proxy, registry, pki, mtls=True, cache_dir=tmp_path / "cache-mtls")
    ref = f"{proxy.host}/library/app:v1"
    good = cert_dir(tmp_path / "c2", pki, client=True)
    code, out = await skopeo_copy(ref, tmp_path / "c", "--src-cert-dir", str(good))
    assert code == 0, out
    for n, refused in enumerate((cert_dir(tmp_path / "c3", pki), cert_dir(tmp_path / "c4", pki, "foreign"))):
        code, out = await skopeo_copy(ref, tmp_path / f"d{n}", "--src-cert-dir", str(refused))
        assert code != 0, out


async def test_ctr_with_ca_and_client_certificate_in_hosts_toml(
    start_proxy: StartProxy,
    registry: Registry,
    containerd: Containerd,
    session: aiohttp.ClientSession,
    proxy_log: ProxyLog,
    pki: Pki,
    tmp_path: Path,
) -> None:
    image = make_image(layer_sizes=(4096,), arch=HOST_ARCH, seed=1402)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    proxy = await tls_proxy(start_proxy, registry, pki, mtls=True)
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    async with session.get(f"{proxy.url}/setup/containerd?registry=docker.io", ssl=ctx) as resp:
        hosts_toml = await resp.text()
    assert f'[host."https://{proxy.host}"]' in hosts_toml

    def write(client: Path, key: Path) -> Path:
        hosts = tmp_path / f"hosts-{client.stem}"
        (hosts / "docker.io").mkdir(parents=True)
        (hosts / "docker.io" / "hosts.toml").write_text(
            hosts_toml + f'  ca = "{pki.ca}"\n  client = [["{client}", "{key}"]]\n'
        )
        return hosts

    ref = "docker.io/library/app:v1"
    await ctr_pull(containerd, ref, write(pki.client.cert, pki.client.key))
    assert await blocking(containerd.image_target, ref) == image.manifest_digest
    await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1")
    await blocking(containerd.ctr, "images", "rm", "--sync", ref)
    # A client certificate from another CA: the handshake fails, ctr goes to Docker Hub
    # itself, and its blackhole stops it.
    out = await ctr_pull(containerd, ref, write(pki.foreign_client.cert, pki.foreign_client.key), check=False)
    assert "proxyconnect" in out, out


@pytest.fixture
async def v6_proxy(registry: Registry, pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[str, TestServer]]:
    cfg = TlsConfig(pki.server.cert, pki.server.key, client_ca=pki.ca)
    settings = replace(
        make_settings(tmp_path / "cache6", {"docker.io": registry.url}, tls=cfg), listen_host="::1"
    )
    server = TestServer(create_app(settings), host="::1", port=0)
    await server.start_server(ssl=tls.server_context(cfg))
    try:
        yield f"[::1]:{server.port}", server
    finally:
        await server.close()


async def test_dockerd_with_certs_d_and_a_client_certificate(
    v6_proxy: tuple[str, TestServer],
    registry: Registry,
    session: aiohttp.ClientSession,
    pki: Pki,
    tmp_path: Path,
) -> None:
    host, _ = v6_proxy
    image = make_image(layer_sizes=(4096, 20_000), arch=HOST_ARCH, seed=1403)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    async with session.get(f"https://{host}/setup/docker", ssl=ctx) as resp:
        daemon_json = json.loads(await resp.read())
    assert daemon_json == {"registry-mirrors": [f"https://{host}"]}

    # dockerd reads certs.d from this fixed place only; the directory is this test's own.
    certs = DOCKER_CERTS_D / host
    certs.mkdir(parents=True)
    try:
        shutil.copy(pki.ca, certs / "ca.crt")
        shutil.copy(pki.client.cert, certs / "client.cert")
        shutil.copy(pki.client.key, certs / "client.key")
        async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
            await docker(daemon, "pull", "app:v1")
            assert await image_id(daemon, "app:v1") == image.config.digest
            assert "registry-1.docker.io" not in daemon.log_tail(400)
        # Another CA's client certificate: the mirror fails, Docker Hub (blackholed) is tried.
        shutil.copy(pki.foreign_client.cert, certs / "client.cert")
        shutil.copy(pki.foreign_client.key, certs / "client.key")
        async with dockerd_with(tmp_path / "docker2", daemon_json) as daemon:
            out = await blocking(daemon.docker, "pull", "app:v1", check=False, timeout=120)
            assert out.returncode != 0 and "registry-1.docker.io" in out.stderr, out.stderr
    finally:
        shutil.rmtree(certs)


async def test_sighup_reloads_the_certificate_without_dropping_connections(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    first, renewed = make_pki(tmp_path / "first"), make_pki(tmp_path / "renewed")
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes(first.server.cert.read_bytes())
    live_key.write_bytes(first.server.key.read_bytes())
    config = tmp_path / "ocicache.yaml"
    config.write_text(yaml.safe_dump({"tls": {"cert": str(live_cert), "key": str(live_key)}}))
    trust = ssl.create_default_context(cafile=first.ca)
    trust.load_verify_locations(cafile=renewed.ca)

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
        return head.split(b"\r\n")[0]

    def peer(writer: asyncio.StreamWriter) -> bytes:
        der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return der

    def der(path: Path) -> bytes:
        return ssl.PEM_cert_to_DER_cert(
            path.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        )

    async with serving(tmp_path / "cache", {"docker.io": fake.url}, "--config", str(config)) as proc:
        assert proc.url.startswith("https://")
        host, _, port = proc.host.rpartition(":")
        assert proc.proc.stdout is not None
        old_reader, old_writer = await asyncio.open_connection(host, int(port), ssl=trust)
        assert peer(old_writer) == der(first.server.cert)
        assert await ask(old_reader, old_writer) == b"HTTP/1.1 200 OK"

        # A broken renewal first: reported, and the old certificate keeps serving.
        live_key.write_text("not a key\n")
        proc.proc.send_signal(signal.SIGHUP)
        line = await asyncio.wait_for(proc.proc.stdout.readline(), 30)
        assert b"TLS reload failed, still serving the previous certificate" in line, line

        live_cert.write_bytes(renewed.server.cert.read_bytes())
        live_key.write_bytes(renewed.server.key.read_bytes())
        proc.proc.send_signal(signal.SIGHUP)
        line = await asyncio.wait_for(proc.proc.stdout.readline(), 30)
        assert b"reloaded TLS certificate" in line, line

        assert await ask(old_reader, old_writer) == b"HTTP/1.1 200 OK"  # still the same connection
        old_writer.close()
        reader, writer = await asyncio.open_connection(host, int(port), ssl=trust)
        assert peer(writer) == der(renewed.server.cert)
        assert await ask(reader, writer) == b"HTTP/1.1 200 OK"
        writer.close()
        assert proc.proc.returncode is None
