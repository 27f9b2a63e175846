"""Real clients pull through ocicache, configured with what its /setup endpoints hand out.

Docker 20.10 (registry-mirrors), containerd 1.6's ctr (hosts.toml: per registry, _default,
override_path) and skopeo (registries.conf) pull synthetic images from real docker-registry
upstreams through an in-process ocicache. Every client runs with HTTP(S)_PROXY pointing at a
refusing loopback port, so a client that went around the proxy (Docker and containerd fall
back to the real registry when a mirror fails) would fail instead of reaching the internet.

The clients are subprocesses; blocking fixture calls run in threads so that the event loop,
which serves the proxy, keeps serving. What the proxy answered is read from aiohttp's access
log (the request line and status of every response it sent); what reached upstream from the
registry's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, StartProxy
from tests.support.containerd import Containerd, running_containerd
from tests.support.dockerd import Blackhole, Dockerd, offline_env, start_dockerd
from tests.support.images import (
    MANIFEST_ACCEPT,
    Image,
    make_image,
    make_index,
    push_image,
    push_index,
)
from tests.support.layout import layout_blobs
from tests.support.registry import Registry, count_blob_gets, running_registry

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"
CLIENT_TIMEOUT = 120.0
LOG_TIMEOUT = 30.0

P = ParamSpec("P")
T = TypeVar("T")


async def blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking fixture call in a thread: the proxy lives on this event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# --- what the proxy served -----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    method: str
    target: str  # path and query, as the client sent them
    status: int

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def ns(self) -> list[str]:
        return parse_qs(urlsplit(self.target).query).get("ns", [])


class ProxyLog(logging.Handler):
    """Every response the proxy finished, from aiohttp's access log, with a way to wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.served: list[Served] = []
        self._loop = loop
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        # aiohttp passes each format field as a record attribute; %r is the request line.
        line = str(getattr(record, "first_request_line", ""))
        method, _, rest = line.partition(" ")
        status = int(getattr(record, "response_status", 0))
        self.served.append(Served(method, rest.rpartition(" ")[0], status))
        self._loop.call_soon_threadsafe(self._changed.set)

    def since(self, mark: int) -> list[Served]:
        return self.served[mark:]

    async def wait_for(self, predicate: Callable[[list[Served]], bool]) -> list[Served]:
        """A client may see its last byte a moment before the proxy logs the response."""
        async with asyncio.timeout(LOG_TIMEOUT):
            while not predicate(self.served):
                self._changed.clear()
                await self._changed.wait()
        return list(self.served)

    async def saw(self, method: str, path: str, *, status: int = 200, since: int = 0) -> Served:
        def match(served: list[Served]) -> list[Served]:
            return [s for s in served[since:] if (s.method, s.path, s.status) == (method, path, status)]

        return match(await self.wait_for(lambda served: bool(match(served))))[0]


@pytest.fixture
async def proxy_log() -> AsyncIterator[ProxyLog]:
    # aiohttp decides per connection whether to log, so this must be on before clients connect.
    logger = logging.getLogger("aiohttp.access")
    handler = ProxyLog(asyncio.get_running_loop())
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def counter(session: aiohttp.ClientSession, proxy: Proxy, name: str, **labels: str) -> float:
    """Sum of the proxy's metric samples called ``name`` with these labels."""
    async with session.get(f"{proxy.url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def blob_hits(session: aiohttp.ClientSession, proxy: Proxy) -> float:
    return await counter(session, proxy, "ocicache_requests_total", kind="blobs", cache="hit", status="200")


async def setup_file(session: aiohttp.ClientSession, proxy: Proxy, what: str) -> str:
    """A client configuration from the proxy's /setup endpoint, as a user would fetch it."""
    async with session.get(f"{proxy.url}/setup/{what}") as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return text


# --- what reached upstream -----------------------------------------------------------------


async def settled_blob_gets(registry: Registry, session: aiohttp.ClientSession) -> int:
    """Upstream blob GETs, once the registry has logged a request sent after all of them."""
    marker = f"/v2/ocicache-test/marker/manifests/m{uuid.uuid4().hex}"
    async with session.head(registry.url + marker) as resp:
        assert resp.status == 404
    await blocking(registry.wait_for_requests, lambda reqs: any(r.path == marker for r in reqs))
    return registry.blob_gets()


async def wait_blob_gets(registry: Registry, count: int) -> None:
    await blocking(registry.wait_for_requests, lambda reqs: count_blob_gets(reqs) >= count)


# --- clients -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dockerd_with(workdir: Path, daemon_json: dict[str, Any]) -> AsyncIterator[Dockerd]:
    """A private dockerd whose daemon.json holds what /setup/docker gave (it wins over the
    fixture's own registry-mirrors and insecure-registries)."""
    daemon = await blocking(start_dockerd, workdir, daemon_json_extra=daemon_json)
    try:
        yield daemon
    finally:
        await blocking(daemon.stop)


async def docker(daemon: Dockerd, *args: str) -> str:
    return (await blocking(daemon.docker, *args, timeout=CLIENT_TIMEOUT)).stdout


async def image_id(daemon: Dockerd, ref: str) -> str:
    return await blocking(daemon.image_id, ref)


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    with running_containerd(tmp_path / "containerd") as ctrd:
        yield ctrd


async def write_hosts(
    session: aiohttp.ClientSession, proxy: Proxy, hosts_dir: Path, registry: str, query: str = ""
) -> None:
    """``hosts_dir/<registry>/hosts.toml`` exactly as /setup/containerd hands it out."""
    text = await setup_file(session, proxy, f"containerd?registry={registry}{query}")
    (hosts_dir / registry).mkdir(parents=True, exist_ok=True)
    (hosts_dir / registry / "hosts.toml").write_text(text)


async def ctr_pull(ctrd: Containerd, ref: str, hosts_dir: Path, *platforms: str, check: bool = True) -> str:
    res = await blocking(
        ctrd.pull, ref, hosts_dir=hosts_dir, platforms=platforms, check=check, timeout=CLIENT_TIMEOUT
    )
    return res.stderr if res.returncode else res.stdout


async def ctr_forget(ctrd: Containerd, *refs: str) -> None:
    """Remove images and let GC take their content, so the next pull fetches everything."""
    await blocking(ctrd.ctr, "images", "rm", "--sync", *refs, timeout=CLIENT_TIMEOUT)


async def run_tool(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
def registry2(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry2") as reg:
        yield reg


def blob_paths(repository: str, image: Image) -> set[str]:
    return {f"/v2/{repository}/blobs/{b.digest}" for b in image.blobs}


# --- Docker --------------------------------------------------------------------------------


async def test_docker_pulls_hub_names_through_the_proxy_and_again_from_its_cache(
    start_proxy: StartProxy,
    registry: Registry,
    session: aiohttp.ClientSession,
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    image = make_image(layer_sizes=(4096, 300_000), arch=HOST_ARCH, seed=101)
    pinned = make_image(layer_sizes=(2048,), arch=HOST_ARCH, seed=102)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    await push_image(session, registry.url, "library/app", pinned)  # by digest only: no tag
    before = await settled_blob_gets(registry, session)
    proxy = await start_proxy({"docker.io": registry.url})
    daemon_json = json.loads(await setup_file(session, proxy, "docker"))

    async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
        mark = len(proxy_log.served)
        await docker(daemon, "pull", "app:v1")  # a Docker Hub name: docker.io/library/app
        assert await image_id(daemon, "app:v1") == image.config.digest
        await wait_blob_gets(registry, before + len(image.blobs))
        first = await settled_blob_gets(registry, session)
        assert first - before == len(image.blobs)

        # It went through the proxy: the ping, the tag, every blob, all answered, no ns=.
        await proxy_log.saw("GET", "/v2/", since=mark)
        await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1", since=mark)
        for path in blob_paths("library/app", image):
            await proxy_log.saw("GET", path, since=mark)
        served = proxy_log.since(mark)
        assert all(s.status < 400 for s in served), served
        assert not any(s.ns for s in served)
        # Nothing failed, so the daemon had no reason to fall back to Docker Hub (which its
        # refusing HTTP proxy would have turned into a failed pull).
        assert "registry-1.docker.io" not in daemon.log_tail(400)

        # Again with the image gone from the daemon: every blob from the cache.
        await docker(daemon, "rmi", "app:v1")
        hits = await blob_hits(session, proxy)
        await docker(daemon, "pull", "app:v1")
        assert await image_id(daemon, "app:v1") == image.config.digest
        assert await blob_hits(session, proxy) - hits == len(image.blobs)
        assert await settled_blob_gets(registry, session) == first

        # A digest pin resolves through the proxy too.
        mark = len(proxy_log.served)
        ref = f"app@{pinned.manifest_digest}"
        await docker(daemon, "pull", ref)
        assert await image_id(daemon, ref) == pinned.config.digest
        await proxy_log.saw("GET", f"/v2/library/app/manifests/{pinned.manifest_digest}", since=mark)


# --- containerd ----------------------------------------------------------------------------


async def test_containerd_one_proxy_for_two_registries_chosen_by_ns(
    start_proxy: StartProxy,
    registry: Registry,
    registry2: Registry,
    containerd: Containerd,
    session: aiohttp.ClientSession,
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    # The same repository and tag on both registries, with different content: only the
    # proxy's choice of upstream decides which one a pull gets.
    hub = make_image(layer_sizes=(4096, 100_000), arch=HOST_ARCH, seed=201)
    ghcr = make_image(layer_sizes=(8192,), arch=HOST_ARCH, seed=202)
    pinned = make_image(layer_sizes=(1024,), arch=HOST_ARCH, seed=203)
    await push_image(session, registry.url, "library/app", hub, tag="v1")
    await push_image(session, registry.url, "library/app", pinned)
    await push_image(session, registry2.url, "library/app", ghcr, tag="v1")
    proxy = await start_proxy({"docker.io": registry.url, "ghcr.io": registry2.url})
    hub_ref, ghcr_ref = "docker.io/library/app:v1", "ghcr.io/library/app:v1"

    # One directory per registry, both pointing at the same proxy.
    named = tmp_path / "hosts-named"
    await write_hosts(session, proxy, named, "docker.io")
    await write_hosts(session, proxy, named, "ghcr.io")
    await ctr_pull(containerd, hub_ref, named)
    await ctr_pull(containerd, ghcr_ref, named)
    assert await blocking(containerd.image_target, hub_ref) == hub.manifest_digest
    assert await blocking(containerd.image_target, ghcr_ref) == ghcr.manifest_digest
    head = await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1")
    assert head.ns == ["docker.io"]
    for path in blob_paths("library/app", ghcr):
        assert (await proxy_log.saw("GET", path)).ns == ["ghcr.io"]
    await wait_blob_gets(registry, len(hub.blobs))
    await wait_blob_gets(registry2, len(ghcr.blobs))

    # A digest pin.
    pinned_ref = f"docker.io/library/app@{pinned.manifest_digest}"
    await ctr_pull(containerd, pinned_ref, named)
    assert await blocking(containerd.image_target, pinned_ref) == pinned.manifest_digest
    await wait_blob_gets(registry, len(hub.blobs) + len(pinned.blobs))
    hub_gets = await settled_blob_gets(registry, session)
    ghcr_gets = await settled_blob_gets(registry2, session)
    assert (hub_gets, ghcr_gets) == (len(hub.blobs) + len(pinned.blobs), len(ghcr.blobs))

    # The catch-all alone serves both registries, by ns=; the content comes from the cache.
    await ctr_forget(containerd, hub_ref, ghcr_ref, pinned_ref)
    assert not {b.digest for b in hub.blobs} & await blocking(containerd.content_digests)
    catch_all = tmp_path / "hosts-default"
    await write_hosts(session, proxy, catch_all, "_default")
    mark = len(proxy_log.served)
    await ctr_pull(containerd, hub_ref, catch_all)
    await ctr_pull(containerd, ghcr_ref, catch_all)
    assert await blocking(containerd.image_target, hub_ref) == hub.manifest_digest
    assert await blocking(containerd.image_target, ghcr_ref) == ghcr.manifest_digest
    assert {s.ns[0] for s in proxy_log.since(mark)} == {"docker.io", "ghcr.io"}
    # A registry the proxy does not front is refused (404) without a connection anywhere;
    # ctr then tries the registry itself, which its refusing HTTP proxy stops.
    mark = len(proxy_log.served)
    out = await ctr_pull(containerd, "example.test/library/app:v1", catch_all, check=False)
    assert "proxyconnect" in out, out
    refused = await proxy_log.saw("HEAD", "/v2/library/app/manifests/v1", status=404, since=mark)
    assert refused.ns == ["example.test"]

    # The path form: the registry named in the mirror URL, override_path = true.
    await ctr_forget(containerd, ghcr_ref)
    path_form = tmp_path / "hosts-path"
    await write_hosts(session, proxy, path_form, "ghcr.io", "&override_path=1")
    mark = len(proxy_log.served)
    await ctr_pull(containerd, ghcr_ref, path_form)
    assert await blocking(containerd.image_target, ghcr_ref) == ghcr.manifest_digest
    seen = await proxy_log.saw("HEAD", "/v2/ghcr.io/library/app/manifests/v1", since=mark)
    assert seen.ns == ["ghcr.io"]
    for path in blob_paths("ghcr.io/library/app", ghcr):
        await proxy_log.saw("GET", path, since=mark)

    # Everything after the first pulls was served from the cache.
    assert await settled_blob_gets(registry, session) == hub_gets
    assert await settled_blob_gets(registry2, session) == ghcr_gets


# --- registries.conf -----------------------------------------------------------------------


async def test_skopeo_uses_registries_conf_mirrors(
    start_proxy: StartProxy,
    registry: Registry,
    registry2: Registry,
    session: aiohttp.ClientSession,
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    hub = make_image(layer_sizes=(4096, 50_000), seed=301)
    ghcr = make_image(layer_sizes=(2048,), seed=302)
    await push_image(session, registry.url, "library/app", hub, tag="v1")
    await push_image(session, registry2.url, "org/tool", ghcr, tag="v2")
    proxy = await start_proxy({"docker.io": registry.url, "ghcr.io": registry2.url})
    conf = tmp_path / "registries.conf"
    conf.write_text(await setup_file(session, proxy, "registries.conf"))

    blackhole = Blackhole()
    try:
        env = offline_env(blackhole)
        for ref, image, layout in (
            ("docker.io/library/app:v1", hub, tmp_path / "hub"),
            ("ghcr.io/org/tool:v2", ghcr, tmp_path / "ghcr"),
        ):
            argv = ["skopeo", "copy", "--registries-conf", str(conf), f"docker://{ref}", f"oci:{layout}"]
            code, out = await run_tool(*argv, env=env)
            assert code == 0, out
            blobs = layout_blobs(layout)
            assert blobs[image.manifest_digest] == image.manifest
            for blob in image.blobs:
                assert blobs[blob.digest] == blob.data
    finally:
        blackhole.close()

    # The registry travelled in the path; containers/image sends no ns=.
    await proxy_log.saw("GET", "/v2/docker.io/library/app/manifests/v1")
    await proxy_log.saw("GET", "/v2/ghcr.io/org/tool/manifests/v2")
    for path in blob_paths("docker.io/library/app", hub) | blob_paths("ghcr.io/org/tool", ghcr):
        await proxy_log.saw("GET", path)
    assert not any(s.ns for s in proxy_log.served)
    # ...and the proxy asked each upstream for the repository without the prefix.
    await wait_blob_gets(registry, len(hub.blobs))
    await wait_blob_gets(registry2, len(ghcr.blobs))
    assert {r.path for r in registry.requests() if r.method == "GET"} >= blob_paths("library/app", hub)
    assert {r.path for r in registry2.requests() if r.method == "GET"} >= blob_paths("org/tool", ghcr)


# --- multi-platform, then offline ----------------------------------------------------------


async def test_multi_platform_image_then_served_offline(
    start_proxy: StartProxy,
    registry: Registry,
    containerd: Containerd,
    session: aiohttp.ClientSession,
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    native = make_image(layer_sizes=(4096, 20_000), arch=HOST_ARCH, seed=401)
    other = make_image(layer_sizes=(4096, 30_000), arch=OTHER_ARCH, seed=402)
    index = make_index([native, other])
    await push_index(session, registry.url, "library/multi", index, tag="v1")
    # tag_ttl=0: every tag request asks upstream, so the offline pulls below take the
    # stale-on-failure path rather than a still-fresh record.
    proxy = await start_proxy({"docker.io": registry.url}, tag_ttl=0)
    daemon_json = json.loads(await setup_file(session, proxy, "docker"))
    hosts = tmp_path / "hosts"
    await write_hosts(session, proxy, hosts, "docker.io")
    ctr_ref = "docker.io/library/multi:v1"

    async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
        await docker(daemon, "pull", "multi:v1")
        assert await image_id(daemon, "multi:v1") == native.config.digest
    await ctr_pull(containerd, ctr_ref, hosts, f"linux/{OTHER_ARCH}")
    have = await blocking(containerd.content_digests)
    assert {other.manifest_digest, *(b.digest for b in other.blobs)} <= have
    assert not {b.digest for b in native.layers} & have

    await blocking(registry.stop)
    mark = len(proxy_log.served)
    # Upstream gone, clients with nothing of the image: a new daemon (dockerd keeps manifests
    # it has seen, even after rmi) and a containerd whose content was collected.
    async with dockerd_with(tmp_path / "docker-fresh", daemon_json) as daemon:
        await docker(daemon, "pull", "multi:v1")
        assert await image_id(daemon, "multi:v1") == native.config.digest
    await ctr_forget(containerd, ctr_ref)
    assert other.manifest_digest not in await blocking(containerd.content_digests)
    await ctr_pull(containerd, ctr_ref, hosts, f"linux/{OTHER_ARCH}")
    assert {other.manifest_digest, *(b.digest for b in other.blobs)} <= await blocking(
        containerd.content_digests
    )

    assert registry.proc.poll() is not None
    for digest in (index.digest, native.manifest_digest, other.manifest_digest):
        await proxy_log.saw("GET", f"/v2/library/multi/manifests/{digest}", since=mark)
    offline = proxy_log.since(mark)
    assert all(s.status < 400 for s in offline), offline
    stale = await counter(session, proxy, "ocicache_requests_total", kind="manifests", cache="stale")
    assert stale >= 2  # one tag HEAD from each client


# --- HEAD honesty --------------------------------------------------------------------------


async def test_tag_head_is_200_only_when_the_manifest_can_be_served(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession
) -> None:
    image = make_image(layer_sizes=(1024,), seed=501)
    await push_image(session, registry.url, "library/app", image, tag="v1")
    await push_image(session, registry.url, "library/app", image, tag="never-pulled")
    proxy = await start_proxy({"docker.io": registry.url}, tag_ttl=0)
    accept = {"Accept": MANIFEST_ACCEPT}
    url = f"{proxy.url}/v2/library/app/manifests"

    async with session.head(f"{url}/v1", headers=accept) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
        assert resp.headers["Content-Length"] == str(len(image.manifest))
    async with session.get(f"{url}/v1", headers=accept) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest
    for missing in (f"{url}/nope", f"{proxy.url}/v2/library/absent/manifests/v1"):
        async with session.head(missing, headers=accept) as resp:
            assert resp.status == 404

    await blocking(registry.stop)
    # Upstream gone: the tag we served stays servable; one we never fetched cannot be vouched for.
    async with session.head(f"{url}/v1", headers=accept) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
    async with session.get(f"{url}/v1", headers=accept) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest
    async with session.head(f"{url}/never-pulled", headers=accept) as resp:
        assert resp.status != 200
        assert resp.status >= 500
