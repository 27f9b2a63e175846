"""HTTPS on the listener: the context, client certificates, and reloading in place."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.core.authconfig import TlsConfig
from proxy.core.configvalues import ConfigError
from proxy.web import tls
from proxy.web.setup import containerd_hosts_toml
from tests.conftest import Proxy, StartProxy
from tests.support.certs import Pair, Pki, make_pki
from tests.support.fake_upstream import FakeUpstream


def client_context(*cas: Path, cert: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ctx.load_verify_locations(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def der(cert: Path) -> bytes:
    first = cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    return ssl.PEM_cert_to_DER_cert(first)


async def get(proxy: Proxy, path: str, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + path, ssl=ctx) as resp:
            await resp.read()
            return resp.status


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


async def start_tls(
    start_proxy: StartProxy, fake: FakeUpstream, cfg: TlsConfig
) -> tuple[Proxy, ssl.SSLContext]:
    ctx = tls.server_context(cfg)
    return await start_proxy({"docker.io": fake.url}, tls=cfg, ssl_context=ctx), ctx


async def test_https_and_the_setup_it_hands_out(
    start_proxy: StartProxy, fake: FakeUpstream, pki: Pki
) -> None:
    proxy, _ = await start_tls(start_proxy, fake, TlsConfig(pki.server.cert, pki.server.key))
    assert proxy.url.startswith("https://")
    ctx = client_context(pki.ca)
    assert await get(proxy, "/healthz", ctx) == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy.url + "/setup/docker", ssl=ctx) as resp:
            daemon = json.loads(await resp.read())
        assert daemon == {"registry-mirrors": [f"https://{proxy.host}"]}
        for what in ("containerd?registry=docker.io", "registries.conf", "buildkitd.toml", "k3s"):
            async with session.get(f"{proxy.url}/setup/{what}", ssl=ctx) as resp:
                text = await resp.text()
            assert "http://" not in text and "insecure = true" not in text, what
            assert "http = true" not in text
        # Plain HTTP to the TLS port is not served.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://{proxy.host}/healthz") as resp:
                await resp.read()


def test_containerd_hosts_toml_over_tls() -> None:
    text = containerd_hosts_toml("proxy:5000", "ghcr.io", ["ghcr.io"], override_path=True, tls=True)
    assert '[host."https://proxy:5000/v2/ghcr.io"]' in text
    assert '# ca = "/etc/containerd/certs.d/ghcr.io/ocicache-ca.crt"' in text


async def test_client_certificates_are_required_with_client_ca(
    start_proxy: StartProxy, fake: FakeUpstream, pki: Pki
) -> None:
    cfg = TlsConfig(pki.server.cert, pki.server.key, client_ca=pki.ca)
    proxy, _ = await start_tls(start_proxy, fake, cfg)
    assert await get(proxy, "/healthz", client_context(pki.ca, cert=pki.client)) == 200
    for refused in (client_context(pki.ca), client_context(pki.ca, cert=pki.foreign_client)):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get(proxy, "/healthz", refused)
    # The refusals cost the proxy nothing lasting: it serves the next good client.
    assert await get(proxy, "/healthz", client_context(pki.ca, cert=pki.client)) == 200


async def test_reload_changes_new_handshakes_and_keeps_open_connections(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, pki: Pki
) -> None:
    live = TlsConfig(tmp_path / "live.crt", tmp_path / "live.key")
    live.cert.write_bytes(pki.server.cert.read_bytes())
    live.key.write_bytes(pki.server.key.read_bytes())
    proxy, ctx = await start_tls(start_proxy, fake, live)
    renewed = make_pki(tmp_path / "renewed")
    both = client_context(pki.ca, renewed.ca)
    port = proxy.server.port or 0

    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=both)
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object.getpeercert(binary_form=True) == der(pki.server.cert)

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        return head.split(b"\r\n")[0]

    assert await ask(reader, writer) == b"HTTP/1.1 200 OK"
    live.cert.write_bytes(renewed.server.cert.read_bytes())
    live.key.write_bytes(renewed.server.key.read_bytes())
    await asyncio.to_thread(tls.check, live)
    tls.reload(ctx, live)

    # The open connection goes on as it was.
    assert await ask(reader, writer) == b"HTTP/1.1 200 OK"
    writer.close()
    # A new one gets the renewed certificate, which only the new CA vouches for.
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port, ssl=both)
    assert writer2.get_extra_info("ssl_object").getpeercert(binary_form=True) == der(renewed.server.cert)
    assert await ask(reader2, writer2) == b"HTTP/1.1 200 OK"
    writer2.close()
    assert await get(proxy, "/healthz", client_context(renewed.ca)) == 200


async def test_a_bad_renewal_leaves_the_old_pair_serving(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, ctx = await start_tls(start_proxy, fake, TlsConfig(pki.server.cert, pki.server.key))
    other = make_pki(tmp_path / "other")
    half_copied = tmp_path / "half.crt"
    half_copied.write_bytes(other.server.cert.read_bytes()[:100])
    for bad, key in (
        (TlsConfig(other.server.cert, pki.server.key), "tls.cert"),  # a key that does not match
        (TlsConfig(half_copied, other.server.key), "tls.cert"),
        (TlsConfig(other.server.cert, tmp_path / "gone.key"), "tls.key"),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}: "):
            tls.check(bad)
        await tls.reload_logged(ctx, bad)  # what SIGHUP runs
        assert "TLS reload failed, still serving the previous certificate" in capsys.readouterr().out
        assert await get(proxy, "/healthz", client_context(pki.ca)) == 200


def test_an_encrypted_key_is_refused_rather_than_prompted_for(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ConfigError, match=r"^tls.(key|cert)"):
        tls.server_context(TlsConfig(pki.server.cert, locked))


def test_a_bad_client_ca(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^tls.client_ca"):
        tls.server_context(TlsConfig(pki.server.cert, pki.server.key, client_ca=junk))


async def test_blobs_over_tls_are_whole_cold_and_warm(
    start_proxy: StartProxy, fake: FakeUpstream, pki: Pki
) -> None:
    """Zero-copy sendfile writes to the socket underneath TLS: over HTTPS it must not be used."""
    data = bytes(range(256)) * 40_000  # 10 MB: large enough for the threaded sendfile path
    digest = fake.add_blob(data)
    proxy, _ = await start_tls(start_proxy, fake, TlsConfig(pki.server.cert, pki.server.key))
    ctx = client_context(pki.ca)
    url = f"{proxy.url}/v2/library/app/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        for _ in ("cold", "warm"):
            async with session.get(url, ssl=ctx) as resp:
                assert resp.status == 200
                assert await resp.read() == data
        async with session.get(url, ssl=ctx, headers={"Range": "bytes=1000-2999999"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[1000:3_000_000]
