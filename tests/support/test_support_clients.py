"""Smoke tests: the real-client fixtures pull from a real registry, no proxy involved.

A recording forwarder sits between a client and the registry wherever the
tests check what a client sends to a *mirror* (method, path, ns= query,
Accept headers); the registry's own log confirms the requests arrived.
"""

from __future__ import annotations

import asyncio
import http.client
import http.server
import os
import platform
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from .containerd import (
    CONTAINERD_BINARY,
    CTR_BINARY,
    Containerd,
    running_containerd,
    write_hosts_toml,
)
from .dockerd import DOCKERD_BINARY, docker_cli, mounts_under, running_dockerd
from .images import OCI_INDEX, Image, Index, make_image, make_index, push_index
from .registry import LoggedRequest, Registry, running_registry

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "real container daemons need root"
    if HOST_ARCH is None:
        return f"unsupported host architecture {platform.machine()}"
    for binary in (DOCKERD_BINARY, CONTAINERD_BINARY, CTR_BINARY):
        if not os.access(binary, os.X_OK):
            return f"{binary} not installed"
    if shutil.which("docker-registry") is None:
        return "docker-registry not installed"
    try:
        docker_cli()
    except FileNotFoundError:
        return "docker CLI not installed"
    return None


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    # scripts/test.sh installs these; a missing one is a broken setup, not a reason to skip.
    missing = _missing_prerequisites()
    assert missing is None, missing


# --------------------------------------------------------------------------
# Recording forwarder


@dataclass(frozen=True)
class Seen:
    method: str
    target: str  # path plus query, as sent
    accept: tuple[str, ...]  # every Accept value, comma lists split

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


class RecordingForwarder:
    """Plain-HTTP forwarder to 127.0.0.1:<upstream_port> that records each request."""

    def __init__(self, upstream_port: int) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        forwarder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                accept = tuple(
                    part.strip()
                    for value in self.headers.get_all("Accept") or []
                    for part in value.split(",")
                    if part.strip()
                )
                with forwarder._lock:
                    forwarder.seen.append(Seen(self.command, self.path, accept))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for key, value in self.headers.items():
                        if key.lower() not in _HOP_BY_HOP:
                            conn.putheader(key, value)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recording-forwarder", daemon=True
        )
        self._thread.start()

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --------------------------------------------------------------------------
# Fixtures


@dataclass
class Pushed:
    name: str  # repository name in the registry, e.g. "library/smoke"
    tag: str
    index: Index

    def image(self, arch: str) -> Image:
        return next(img for img in self.index.images if img.platform == ("linux", arch))


def _push_multiarch(registry_url: str, name: str, tag: str) -> Pushed:
    images = [make_image(arch=arch, layer_sizes=(2048,)) for arch in ("amd64", "arm64")]
    index = make_index(images)

    async def push() -> None:
        async with aiohttp.ClientSession() as session:
            await push_index(session, registry_url, name, index, tag)

    asyncio.run(push())
    return Pushed(name, tag, index)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def pushed(registry: Registry) -> Pushed:
    return _push_multiarch(registry.url, "library/smoke", "v1")


@pytest.fixture
def forwarder(registry: Registry) -> Iterator[RecordingForwarder]:
    fwd = RecordingForwarder(registry.port)
    try:
        yield fwd
    finally:
        fwd.close()


def _registry_saw(registry: Registry, method: str, path_prefix: str) -> list[LoggedRequest]:
    def match(reqs: list[LoggedRequest]) -> list[LoggedRequest]:
        return [r for r in reqs if r.method == method and r.path.startswith(path_prefix)]

    return match(registry.wait_for_requests(lambda reqs: bool(match(reqs))))


def _assert_cleaned_up(pids: list[int], dirs: list[Path]) -> None:
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            continue
        assert state == "Z", f"pid {pid} still running"  # a zombie awaiting reaping is gone enough
    assert mounts_under(*dirs) == []


def _daemon_processes() -> set[str]:
    """dockerd/containerd processes (not zombies) started by these fixtures, as "pid args"."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = set()
    for line in out.splitlines():
        pid, stat, args = line.split(None, 2)
        if stat.startswith("Z") or not ("dockerd" in args or "containerd" in args):
            continue
        if "/tmp/ocd-" in args or "/tmp/octrd-" in args or "pytest-of-" in args:
            found.add(f"{pid} {args}")
    return found


@pytest.fixture(autouse=True)
def _no_daemon_left_behind() -> Iterator[None]:
    """Whatever a test started (dockerd, its containerd, containerd) is gone when it ends."""
    before = _daemon_processes()
    yield
    assert _daemon_processes() - before == set()


# --------------------------------------------------------------------------
# dockerd


def test_dockerd_pulls_from_insecure_registry(tmp_path: Path, registry: Registry, pushed: Pushed) -> None:
    host = f"127.0.0.1:{registry.port}"
    ref = f"{host}/{pushed.name}:{pushed.tag}"
    with running_dockerd(tmp_path / "docker", insecure_registries=[host]) as dockerd:
        dockerd.docker("pull", ref)
        assert dockerd.image_id(ref) == pushed.image(HOST_ARCH or "amd64").config.digest

        other = f"{host}/{pushed.name}:{OTHER_ARCH}"
        dockerd.docker("pull", "--platform", f"linux/{OTHER_ARCH}", ref)
        dockerd.docker("tag", ref, other)
        arch = dockerd.docker("image", "inspect", "--format", "{{.Architecture}}", other).stdout.strip()
        assert arch == OTHER_ARCH
        assert dockerd.image_id(other) == pushed.image(OTHER_ARCH).config.digest
    _registry_saw(registry, "GET", f"/v2/{pushed.name}/blobs/")


def test_dockerd_pulls_hub_name_through_mirror(
    tmp_path: Path, registry: Registry, pushed: Pushed, forwarder: RecordingForwarder
) -> None:
    short = f"{pushed.name.removeprefix('library/')}:{pushed.tag}"
    with running_dockerd(tmp_path / "docker", mirrors=[forwarder.url]) as dockerd:
        info = dockerd.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        assert forwarder.url in info
        dockerd.docker("pull", short)
        image = pushed.image(HOST_ARCH or "amd64")
        assert dockerd.image_id(short) == image.config.digest

    seen = forwarder.requests()
    # dockerd 20.10: ping, HEAD by tag, then GETs by digest; repo keeps "library/"; no ns= query.
    assert [(s.method, s.path) for s in seen[:2]] == [
        ("GET", "/v2/"),
        ("HEAD", f"/v2/{pushed.name}/manifests/{pushed.tag}"),
    ]
    assert all("ns" not in s.query for s in seen)
    assert OCI_INDEX in seen[1].accept
    gets = {s.path for s in seen if s.method == "GET"}
    assert f"/v2/{pushed.name}/manifests/{pushed.index.digest}" in gets
    assert f"/v2/{pushed.name}/manifests/{image.manifest_digest}" in gets
    for blob in image.blobs:
        assert f"/v2/{pushed.name}/blobs/{blob.digest}" in gets
    # ...and the registry behind the mirror really served them.
    for blob in image.blobs:
        _registry_saw(registry, "GET", f"/v2/{pushed.name}/blobs/{blob.digest}")


def test_dockerd_falls_back_to_hub_when_mirror_lacks_image(
    tmp_path: Path, registry: Registry, forwarder: RecordingForwarder
) -> None:
    with running_dockerd(tmp_path / "docker", mirrors=[forwarder.url]) as dockerd:
        res = dockerd.docker("pull", "absent:v1", check=False, timeout=120)
    assert res.returncode != 0
    # The Hub fallback was attempted but stopped by the refusing loopback proxy.
    assert "registry-1.docker.io" in res.stderr
    assert "proxyconnect" in res.stderr
    assert ("HEAD", "/v2/library/absent/manifests/v1") in {(s.method, s.path) for s in forwarder.requests()}


def test_two_dockerds_run_side_by_side(tmp_path: Path) -> None:
    with running_dockerd(tmp_path / "a") as a, running_dockerd(tmp_path / "b") as b:
        assert a.sock != b.sock and a.exec_root != b.exec_root
        assert a.containerd_socket != b.containerd_socket
        fmt = "{{.ID}} {{.DockerRootDir}}"
        ia = a.docker("info", "--format", fmt).stdout.split()
        ib = b.docker("info", "--format", fmt).stdout.split()
        assert ia[0] != ib[0]
        assert (ia[1], ib[1]) == (str(a.data_root), str(b.data_root))
        pids = [a.pid, b.pid]
        for d in (a, b):
            cd_pid = d._containerd_pid
            assert cd_pid is not None
            pids.append(cd_pid)
        dirs = [a.data_root, b.data_root, a.runtime_dir, b.runtime_dir]
    assert (tmp_path / "a" / "key.json").exists()  # not /etc/docker/key.json
    _assert_cleaned_up(pids, dirs)
    assert not a.runtime_dir.exists() and not b.runtime_dir.exists()
    a.stop()  # idempotent


def test_dockerd_start_failure_reports_log(tmp_path: Path) -> None:
    from .dockerd import DaemonStartError, start_dockerd

    with pytest.raises(DaemonStartError, match="no-such-option"):
        start_dockerd(tmp_path / "bad", daemon_json_extra={"no-such-option": True})


# --------------------------------------------------------------------------
# containerd


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    with running_containerd(tmp_path / "containerd") as ctrd:
        yield ctrd


def _assert_ns(seen: list[Seen], registry_host: str) -> None:
    assert seen, "mirror saw no requests"
    for s in seen:
        assert s.query.get("ns") == [registry_host], s.target


def test_containerd_pulls_via_hosts_toml(
    tmp_path: Path, containerd: Containerd, registry: Registry, pushed: Pushed, forwarder: RecordingForwarder
) -> None:
    hosts = tmp_path / "hosts"
    written = write_hosts_toml(hosts, "docker.io", forwarder.url)
    assert written == hosts / "docker.io" / "hosts.toml"
    ref = f"docker.io/{pushed.name}:{pushed.tag}"
    containerd.pull(ref, hosts_dir=hosts)

    assert ref in containerd.image_refs()
    assert containerd.image_target(ref) == pushed.index.digest
    image = pushed.image(HOST_ARCH or "amd64")
    assert {b.digest for b in image.blobs} <= containerd.content_digests()

    seen = forwarder.requests()
    _assert_ns(seen, "docker.io")
    # ctr 1.6: no /v2/ ping; HEAD by tag first, then GETs by digest.
    assert (seen[0].method, seen[0].path) == ("HEAD", f"/v2/{pushed.name}/manifests/{pushed.tag}")
    assert OCI_INDEX in seen[0].accept
    assert "/v2/" not in {s.path for s in seen}
    for blob in image.blobs:
        _registry_saw(registry, "GET", f"/v2/{pushed.name}/blobs/{blob.digest}?ns=docker.io")


def test_containerd_platform_flags(
    tmp_path: Path, containerd: Containerd, registry: Registry, pushed: Pushed, forwarder: RecordingForwarder
) -> None:
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", forwarder.url)
    ref = f"docker.io/{pushed.name}:{pushed.tag}"
    wanted, unwanted = pushed.image(OTHER_ARCH), pushed.image(HOST_ARCH or "amd64")

    containerd.pull(ref, hosts_dir=hosts, platforms=[f"linux/{OTHER_ARCH}"])
    fetched = {s.path.rsplit("/", 1)[-1] for s in forwarder.requests() if s.method == "GET"}
    assert wanted.manifest_digest in fetched and unwanted.manifest_digest not in fetched
    assert {b.digest for b in wanted.blobs} <= fetched
    assert not {b.digest for b in unwanted.blobs} & fetched

    containerd.pull(ref, hosts_dir=hosts, all_platforms=True)
    have = containerd.content_digests()
    for img in pushed.index.images:
        assert {img.manifest_digest, *(b.digest for b in img.blobs)} <= have
    _assert_ns(forwarder.requests(), "docker.io")


def test_containerd_override_path_and_default(
    tmp_path: Path, containerd: Containerd, registry: Registry, pushed: Pushed, forwarder: RecordingForwarder
) -> None:
    hosts = tmp_path / "hosts"
    repo = pushed.name  # the registry has it as library/smoke
    # override_path: the URL path replaces "/v2" verbatim.
    write_hosts_toml(hosts, "ghcr.io", f"{forwarder.url}/v2", override_path=True)
    containerd.pull(f"ghcr.io/{repo}:{pushed.tag}", hosts_dir=hosts)
    seen = forwarder.requests()
    _assert_ns(seen, "ghcr.io")
    assert seen[0].path == f"/v2/{repo}/manifests/{pushed.tag}"

    # A registry name-spaced path, as a proxy would route it; the plain registry 404s.
    write_hosts_toml(hosts, "quay.io", f"{forwarder.url}/v2/quay.io", override_path=True)
    res = containerd.pull(f"quay.io/{repo}:{pushed.tag}", hosts_dir=hosts, check=False, timeout=120)
    assert res.returncode != 0
    quay = [s for s in forwarder.requests() if s.query.get("ns") == ["quay.io"]]
    assert quay[0].method == "HEAD" and quay[0].path == f"/v2/quay.io/{repo}/manifests/{pushed.tag}"
    # ...after which ctr fell back to https://quay.io, refused by the loopback proxy.
    assert "proxyconnect" in res.stderr

    # _default is the catch-all for hosts without their own directory.
    write_hosts_toml(hosts, "_default", forwarder.url)
    containerd.pull(f"example.test/{repo}:{pushed.tag}", hosts_dir=hosts)
    last = forwarder.requests()[-1]
    assert last.query.get("ns") == ["example.test"]


def test_containerd_stop_cleans_up(tmp_path: Path) -> None:
    with running_containerd(tmp_path / "c", snapshotter="overlayfs") as ctrd:
        assert ctrd.address.is_socket()
        assert ctrd.ctr("namespaces", "ls", "-q").returncode == 0
        pid, dirs = ctrd.pid, [ctrd.root, ctrd.runtime_dir]
    _assert_cleaned_up([pid], dirs)
    assert not ctrd.runtime_dir.exists()
    ctrd.stop()  # idempotent


def test_write_hosts_toml_content(tmp_path: Path) -> None:
    path = write_hosts_toml(
        tmp_path,
        "127.0.0.1:5000",
        "http://127.0.0.1:6000/v2/x",
        override_path=True,
        capabilities=("pull",),
        skip_verify=False,
        server="http://127.0.0.1:7000",
    )
    assert path == tmp_path / "127.0.0.1:5000" / "hosts.toml"
    doc = tomllib.loads(path.read_text())
    assert doc == {
        "server": "http://127.0.0.1:7000",
        "host": {
            "http://127.0.0.1:6000/v2/x": {
                "capabilities": ["pull"],
                "skip_verify": False,
                "override_path": True,
            }
        },
    }
    default = tomllib.loads(write_hosts_toml(tmp_path, "_default", "http://127.0.0.1:1").read_text())
    assert default == {
        "host": {"http://127.0.0.1:1": {"capabilities": ["pull", "resolve"], "skip_verify": True}}
    }
    with pytest.raises(ValueError):
        write_hosts_toml(tmp_path, "../etc", "http://127.0.0.1:1")
