"""The /setup generators as pure functions, and the one handler serving them.

That each file really works is shown by tests/test_clients.py, which feeds the endpoint's
output to dockerd, ctr and skopeo; here: exact content, and that nothing a client sends can
get into a generated file."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.errors import Code, OciError
from proxy.core.hostheader import proxy_address
from proxy.web.setup import (
    buildkitd_toml,
    containerd_hosts_toml,
    docker_daemon_json,
    k3s_registries_yaml,
    registries_conf,
)
from tests.conftest import StartProxy

PROXY = "cache.example:5000"
UPSTREAMS = ["docker.io", "ghcr.io", "registry.k8s.io"]
FALLBACK = "127.0.0.1:5000"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("cache.example:5000", "cache.example:5000"),
        ("Cache.Example", "cache.example"),
        ("10.0.0.7:80", "10.0.0.7:80"),
        ("[::1]:5000", "[::1]:5000"),
        ("[fe80::1]", "[fe80::1]"),
        ("localhost:65535", "localhost:65535"),
    ],
)
def test_proxy_address_takes_a_plain_host_header(header: str, expected: str) -> None:
    assert proxy_address(header, FALLBACK) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        'evil"host',
        "a b",
        "host:5000\n",
        "host\r\nX-Injected: 1",
        "host/path",
        "host:0",
        "host:65536",
        "host:",
        "user@host",
        "a:b:c",
        "-leading.dash",
        "trailing.dash-",
        "[::1",
        "host:5000]",
        "h" * 300,
        "höst",
        "host#x",
    ],
)
def test_proxy_address_falls_back_for_anything_else(header: str | None) -> None:
    assert proxy_address(header, FALLBACK) == FALLBACK


def test_docker_daemon_json() -> None:
    assert json.loads(docker_daemon_json(PROXY, UPSTREAMS)) == {
        "registry-mirrors": [f"http://{PROXY}"],
        "insecure-registries": [PROXY],
    }


@pytest.mark.parametrize("upstreams", [["ghcr.io", "docker.io"], []])
def test_docker_needs_docker_hub_as_the_default_upstream(upstreams: list[str]) -> None:
    # The daemon's mirror requests name no registry, so they go to the default upstream.
    with pytest.raises(OciError) as err:
        docker_daemon_json(PROXY, upstreams)
    assert err.value.code is Code.NAME_UNKNOWN


def test_containerd_hosts_toml_for_docker_hub() -> None:
    text = containerd_hosts_toml(PROXY, "docker.io", UPSTREAMS, override_path=False)
    assert tomllib.loads(text) == {
        "server": "https://registry-1.docker.io",
        "host": {f"http://{PROXY}": {"capabilities": ["pull", "resolve"]}},
    }


def test_containerd_hosts_toml_path_form() -> None:
    text = containerd_hosts_toml(PROXY, "ghcr.io", UPSTREAMS, override_path=True)
    assert tomllib.loads(text) == {
        "server": "https://ghcr.io",
        "host": {f"http://{PROXY}/v2/ghcr.io": {"capabilities": ["pull", "resolve"], "override_path": True}},
    }


def test_containerd_hosts_toml_catch_all_has_no_server() -> None:
    # _default stands for every registry; containerd falls back to each one's own host.
    text = containerd_hosts_toml(PROXY, "_default", UPSTREAMS, override_path=False)
    assert tomllib.loads(text) == {"host": {f"http://{PROXY}": {"capabilities": ["pull", "resolve"]}}}


@pytest.mark.parametrize(
    ("registry", "override_path", "code"),
    [
        ("quay.io", False, Code.NAME_UNKNOWN),
        ('ghcr.io"\n[x]', False, Code.NAME_UNKNOWN),
        ("../etc", False, Code.NAME_UNKNOWN),
        ("_default", True, Code.NAME_INVALID),
    ],
)
def test_containerd_hosts_toml_refuses(registry: str, override_path: bool, code: Code) -> None:
    with pytest.raises(OciError) as err:
        containerd_hosts_toml(PROXY, registry, UPSTREAMS, override_path=override_path)
    assert err.value.code is code


def test_registries_conf_has_one_mirror_per_upstream() -> None:
    doc = tomllib.loads(registries_conf(PROXY, [*UPSTREAMS, "myreg.example:5000"]))
    assert doc == {
        "registry": [
            {
                "prefix": name,
                "location": name,
                "mirror": [{"location": f"{PROXY}/{name}", "insecure": True}],
            }
            for name in UPSTREAMS
        ]
    }


def test_buildkitd_toml() -> None:
    doc = tomllib.loads(buildkitd_toml(PROXY, UPSTREAMS))
    assert doc == {
        "registry": {
            **{name: {"mirrors": [PROXY]} for name in UPSTREAMS},
            PROXY: {"http": True, "insecure": True},
        }
    }


def test_k3s_registries_yaml() -> None:
    doc = yaml.safe_load(k3s_registries_yaml(PROXY, UPSTREAMS))
    assert doc == {"mirrors": {name: {"endpoint": [f"http://{PROXY}"]} for name in UPSTREAMS}}


def test_ipv6_proxy_address_survives_every_format() -> None:
    proxy = "[fd00::5]:5000"
    assert json.loads(docker_daemon_json(proxy, UPSTREAMS))["insecure-registries"] == [proxy]
    assert tomllib.loads(buildkitd_toml(proxy, UPSTREAMS))["registry"]["docker.io"] == {"mirrors": [proxy]}
    k3s = yaml.safe_load(k3s_registries_yaml(proxy, UPSTREAMS))
    assert k3s["mirrors"]["ghcr.io"] == {"endpoint": [f"http://{proxy}"]}


# --- the handler, over a socket ------------------------------------------------------------


async def _get(port: int, target: str, host: str | None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly the Host header given, byte for byte; with none, HTTP/1.0
    (where Host is optional, while HTTP/1.1 parsers refuse a request without it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"GET {target} HTTP/{'1.0' if host is None else '1.1'}", "Connection: close"]
        if host is not None:
            head.append(f"Host: {host}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), headers, body


UNUSED_UPSTREAMS = {"docker.io": "http://127.0.0.1:9", "ghcr.io": "http://127.0.0.1:9"}


async def test_setup_uses_the_host_the_client_used(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(UNUSED_UPSTREAMS)
    port = proxy.server.port or 0
    status, headers, body = await _get(port, "/setup/docker", "mirror.internal:5000")
    assert status == 200
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body)["registry-mirrors"] == ["http://mirror.internal:5000"]

    status, headers, body = await _get(port, "/setup/containerd?registry=ghcr.io&override_path=1", proxy.host)
    assert status == 200
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert tomllib.loads(body.decode())["host"][f"http://{proxy.host}/v2/ghcr.io"]["override_path"] is True


@pytest.mark.parametrize("host", [None, 'x"y', "a b", "h:99999"])
async def test_setup_falls_back_to_loopback_and_the_port_the_request_used(
    start_proxy: StartProxy, host: str | None
) -> None:
    proxy = await start_proxy(UNUSED_UPSTREAMS)
    status, _, body = await _get(proxy.server.port or 0, "/setup/k3s", host)
    assert status == 200
    assert yaml.safe_load(body)["mirrors"]["docker.io"] == {"endpoint": [proxy.url]}


@pytest.mark.parametrize(
    "target",
    ["/setup/registries.conf", "/setup/buildkitd.toml", "/setup/k3s", "/setup/containerd?registry=_default"],
)
async def test_every_setup_parses(start_proxy: StartProxy, target: str) -> None:
    proxy = await start_proxy(UNUSED_UPSTREAMS)
    status, _, body = await _get(proxy.server.port or 0, target, proxy.host)
    assert status == 200
    loads = yaml.safe_load if "k3s" in target else tomllib.loads
    assert loads(body.decode())
    assert proxy.host in body.decode()


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/setup/containerd?registry=quay.io", 404, "NAME_UNKNOWN"),
        # A missing parameter is a bad request, not an unknown name.
        ("/setup/containerd", 400, "REQUEST_INVALID"),
        ("/setup/containerd?registry=", 400, "REQUEST_INVALID"),
        ("/setup/containerd?registry=_default&override_path=true", 400, "NAME_INVALID"),
        ("/setup/nerdctl", 404, "NAME_UNKNOWN"),
    ],
)
async def test_setup_errors_are_oci_errors(
    start_proxy: StartProxy, target: str, status: int, code: str
) -> None:
    proxy = await start_proxy(UNUSED_UPSTREAMS)
    got, headers, body = await _get(proxy.server.port or 0, target, proxy.host)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == code


async def test_docker_setup_refused_when_docker_hub_is_not_the_default(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"ghcr.io": "http://127.0.0.1:9", "docker.io": "http://127.0.0.1:9"})
    status, _, body = await _get(proxy.server.port or 0, "/setup/docker", proxy.host)
    assert status == 404
    assert json.loads(body)["errors"][0]["detail"] == {"default": "ghcr.io"}


# --- properties: whatever Host a client sends, every file parses back, with nothing injected ---

_ADDRESS_JUNK = ['"', "'", "\\", "\n", "\r\n", "]", "[", "=", "#", " ", ":", "/", "{", "}", ",", "\x00", "é"]
host_headers = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(:[0-9]{1,5})?", fullmatch=True),
    st.from_regex(r"\[[0-9a-f:.]{2,20}\](:[0-9]{1,5})?", fullmatch=True),
    st.lists(st.one_of(st.sampled_from(_ADDRESS_JUNK), st.text(max_size=4)), max_size=12).map("".join),
    st.sampled_from(["docker.io", "localhost:5000", "myreg.example:5000"]),  # an upstream's own name
)
upstream_names = st.lists(
    st.one_of(
        st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+){0,3}(:[0-9]{1,5})?", fullmatch=True),
        st.sampled_from(["docker.io", "ghcr.io", "localhost:5000", "myreg.example:5000"]),
    ),
    min_size=1,
    max_size=5,
    unique=True,
)


@given(host_headers, upstream_names, st.booleans())
# Found by this test: a client reaching the proxy by an upstream's name got a buildkitd.toml
# with [registry."docker.io"] twice, which TOML refuses.
@example(host="docker.io", upstreams=["docker.io", "ghcr.io"], tls=False)
@example(host="localhost:5000", upstreams=["docker.io", "localhost:5000"], tls=True)
def test_every_file_parses_back_with_only_its_own_keys(host: str, upstreams: list[str], tls: bool) -> None:
    proxy = proxy_address(host, FALLBACK)
    scheme = "https" if tls else "http"

    if upstreams[0] == "docker.io":
        daemon = json.loads(docker_daemon_json(proxy, upstreams, tls=tls))
        expected: dict[str, object] = {"registry-mirrors": [f"{scheme}://{proxy}"]}
        if not tls:
            expected["insecure-registries"] = [proxy]
        assert daemon == expected

    for registry in [*upstreams, "_default"]:
        for override in (False, True) if registry != "_default" else (False,):
            doc = tomllib.loads(
                containerd_hosts_toml(proxy, registry, upstreams, override_path=override, tls=tls)
            )
            url = f"{scheme}://{proxy}" + (f"/v2/{registry}" if override else "")
            table: dict[str, object] = {"capabilities": ["pull", "resolve"]}
            if override:
                table["override_path"] = True
            assert doc.pop("host") == {url: table}
            if registry != "_default":
                server = doc.pop("server")
                assert isinstance(server, str) and server.startswith("https://")
            assert doc == {}

    conf = tomllib.loads(registries_conf(proxy, upstreams, tls=tls))
    mirror: dict[str, object] = {"location": "", **({} if tls else {"insecure": True})}
    assert conf.get("registry", []) == [
        {"prefix": name, "location": name, "mirror": [{**mirror, "location": f"{proxy}/{name}"}]}
        for name in upstreams
        if ":" not in name
    ]

    buildkit = tomllib.loads(buildkitd_toml(proxy, upstreams, tls=tls))
    assert set(buildkit) == {"registry"}
    registries = buildkit["registry"]
    assert set(registries) == {*upstreams, proxy}
    for name in upstreams:
        assert registries[name]["mirrors"] == [proxy]
    own = {k: v for k, v in registries[proxy].items() if k != "mirrors"}
    assert own == ({} if tls else {"http": True, "insecure": True})

    k3s = yaml.safe_load(k3s_registries_yaml(proxy, upstreams, tls=tls))
    assert k3s == {"mirrors": {name: {"endpoint": [f"{scheme}://{proxy}"]} for name in upstreams}}
