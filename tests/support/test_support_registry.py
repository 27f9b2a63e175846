"""Smoke tests for the test-support registry runner and image builder."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .images import (
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    make_image,
    make_index,
    push_image,
    push_index,
)
from .registry import (
    LoggedRequest,
    Registry,
    count_blob_gets,
    parse_requests,
    running_registry,
    start_registry,
)

TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


async def get_manifest(
    session: aiohttp.ClientSession, reg: Registry, name: str, ref: str
) -> tuple[int, str, bytes, str]:
    url = f"{reg.url}/v2/{name}/manifests/{ref}"
    # distribution 2.8 hides OCI content from clients that don't Accept it.
    headers = {"Accept": MANIFEST_ACCEPT}
    async with session.get(url, headers=headers, timeout=TIMEOUT) as resp:
        body = await resp.read()
        return resp.status, resp.content_type, body, resp.headers.get("Docker-Content-Digest", "")


async def get_blob(session: aiohttp.ClientSession, reg: Registry, name: str, digest: str) -> bytes:
    url = f"{reg.url}/v2/{name}/blobs/{digest}"
    async with session.get(url, timeout=TIMEOUT) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def run_skopeo(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "skopeo", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def test_make_image_is_reproducible_and_unpackable() -> None:
    img = make_image(layer_sizes=(0, 1000, 5000), seed=7)
    assert img == make_image(layer_sizes=(0, 1000, 5000), seed=7)
    assert img.manifest_digest != make_image(layer_sizes=(0, 1000, 5000), seed=8).manifest_digest
    assert make_image().manifest_digest != make_image().manifest_digest  # seed=None: fresh
    manifest = json.loads(img.manifest)
    assert manifest["mediaType"] == OCI_MANIFEST == img.media_type
    assert manifest["config"]["digest"] == img.config.digest
    config = json.loads(img.config.data)
    assert (config["os"], config["architecture"]) == img.platform == ("linux", "amd64")
    assert config["rootfs"]["type"] == "layers"
    paths = set()
    for blob, diff_id, size in zip(img.layers, config["rootfs"]["diff_ids"], (0, 1000, 5000), strict=True):
        assert blob.digest == "sha256:" + hashlib.sha256(blob.data).hexdigest()
        tar_bytes = gzip.decompress(blob.data)
        assert diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
        assert len(files) == 1 and files[0].size == size
        paths.add(files[0].name)
    assert len(paths) == 3
    docker = make_image(flavour="docker", arch="arm64", seed=7)
    assert json.loads(docker.manifest)["mediaType"] == DOCKER_MANIFEST
    assert {b.media_type for b in docker.layers} == {DOCKER_LAYER}
    index = make_index([img, docker], flavour="docker")
    entries = json.loads(index.manifest)["manifests"]
    assert index.media_type == DOCKER_LIST
    assert [e["platform"]["architecture"] for e in entries] == ["amd64", "arm64"]


def test_parse_requests_pairs_logrus_and_access_lines() -> None:
    # Shapes copied from a real docker-registry 2.8.2 run (fields trimmed).
    digest = "sha256:" + "ab" * 32
    lines = [
        'time="t" level=info msg="listening on 127.0.0.1:5000" go.version=go1.19.8',
        '127.0.0.1 - - [27/Nov/2026:22:59:39 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "curl/7.88.1"',
        (
            'time="t" level=info msg="response completed" http.request.id=r1 '
            "http.request.method=GET http.request.uri=/v2/ http.response.status=200"
        ),
        '127.0.0.1 - - [27/Nov/2026:22:59:39 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"',
        (
            'time="t" level=error msg="response completed with error" auth.user.name=alice '
            'err.code="blob unknown" http.request.id=r2 http.request.method=GET '
            f'http.request.uri="/v2/a/b/blobs/{digest}?x=1" http.response.status=404'
        ),
        f'127.0.0.1 - - [27/Nov/2026:22:59:39 +0000] "GET /v2/a/b/blobs/{digest}?x=1 HTTP/1.1" 404 1 "" "x"',
    ]
    assert parse_requests(lines) == [
        LoggedRequest("GET", "/v2/", 401),
        LoggedRequest("GET", "/v2/", 200, "r1"),
        LoggedRequest("GET", f"/v2/a/b/blobs/{digest}?x=1", 404, "r2"),
    ]


@pytest.mark.asyncio
async def test_push_and_pull_roundtrip(registry: Registry) -> None:
    oci = make_image(seed=1)
    docker = make_image(seed=2, flavour="docker", layer_sizes=(100,))
    index = make_index([make_image(seed=3), make_image(seed=4, arch="arm64")])
    async with aiohttp.ClientSession() as session:
        await push_image(session, registry.url, "test/oci", oci, "v1")
        await push_image(session, registry.url, "test/docker", docker, "v1")
        await push_index(session, registry.url, "test/multi", index, "v1")
        # HEAD + POST + PUT per blob, one PUT per manifest, plus the index.
        before = sum(3 * len(img.blobs) + 1 for img in (oci, docker, *index.images)) + 1
        assert len(registry.wait_for_requests(lambda rs: len(rs) >= before)) == before
        await push_image(session, registry.url, "test/oci", oci, "v1")  # blobs exist: HEADs only
        again = registry.wait_for_requests(lambda rs: len(rs) >= before + 4)
        assert sorted(r.method for r in again[before:]) == ["HEAD"] * 3 + ["PUT"]

        expected: list[tuple[str, str, bytes, str, str]] = [
            ("test/oci", "v1", oci.manifest, oci.manifest_digest, OCI_MANIFEST),
            ("test/docker", "v1", docker.manifest, docker.manifest_digest, DOCKER_MANIFEST),
            ("test/multi", "v1", index.manifest, index.digest, OCI_INDEX),
        ]
        for img in index.images:
            by_digest = img.manifest_digest
            expected.append(("test/multi", by_digest, img.manifest, by_digest, OCI_MANIFEST))
        for name, ref, body, digest, media_type in expected:
            assert await get_manifest(session, registry, name, ref) == (200, media_type, body, digest)

        pulls: list[tuple[str, Image]] = [("test/oci", oci), ("test/docker", docker)]
        pulls += [("test/multi", img) for img in index.images]
        for name, img in pulls:
            for blob in img.blobs:
                assert await get_blob(session, registry, name, blob.digest) == blob.data
        # Twice more for one layer, to see per-digest counting.
        for _ in range(2):
            await get_blob(session, registry, "test/oci", oci.layers[0].digest)

    total = sum(len(img.blobs) for _, img in pulls) + 2
    # The registry may finish sending a body before it writes the log line.
    registry.wait_for_requests(lambda rs: sum(r.method == "GET" for r in rs) >= total + len(expected))
    assert registry.blob_gets() == total
    assert registry.blob_gets(oci.layers[0].digest) == 3
    assert registry.blob_gets(docker.config.digest) == 1
    assert registry.blob_gets("sha256:" + "0" * 64) == 0


@pytest.mark.asyncio
async def test_htpasswd(tmp_path: Path) -> None:
    creds = ("alice", "s3cret")
    with running_registry(tmp_path / "auth", htpasswd=creds) as reg:
        image = make_image(seed=5)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{reg.url}/v2/", timeout=TIMEOUT) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Basic ")
            good = {"Authorization": aiohttp.encode_basic_auth(*creds)}
            async with session.get(f"{reg.url}/v2/", headers=good, timeout=TIMEOUT) as resp:
                assert resp.status == 200
            bad = {"Authorization": aiohttp.encode_basic_auth("alice", "nope")}
            async with session.get(f"{reg.url}/v2/", headers=bad, timeout=TIMEOUT) as resp:
                assert resp.status == 401
            with pytest.raises(RuntimeError, match="401"):
                await push_image(session, reg.url, "private/img", image, "v1")
            await push_image(session, reg.url, "private/img", image, "v1", auth=creds)
        out = await run_skopeo(
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:s3cret",
            f"docker://127.0.0.1:{reg.port}/private/img:v1",
        )
        assert json.loads(out)["Digest"] == image.manifest_digest
        reqs = reg.wait_for_requests(lambda rs: any(r.method == "PUT" for r in rs))
        # 401s never reach distribution's app logger; they come from the access
        # log, so they have no request id.
        assert LoggedRequest("GET", "/v2/", 401) in reqs
        blob_head = f"/v2/private/img/blobs/{image.config.digest}"
        assert LoggedRequest("HEAD", blob_head, 401) in reqs
        pings = [r.status for r in reqs if r.method == "GET" and r.path == "/v2/"]
        assert pings[:3] == [401, 200, 401]  # skopeo's own unauthenticated pings follow
        put = ("PUT", "/v2/private/img/manifests/v1", 201)
        assert any((r.method, r.path, r.status) == put for r in reqs)


@pytest.mark.asyncio
async def test_restart_keeps_content(tmp_path: Path) -> None:
    workdir = tmp_path / "persist"
    image = make_image(seed=6, flavour="docker")
    first = start_registry(workdir)
    try:
        async with aiohttp.ClientSession() as session:
            await push_image(session, first.url, "keep/me", image, "v1")
    finally:
        first.stop()
    first.stop()  # idempotent
    assert first.proc.returncode is not None
    with running_registry(workdir, port=first.port) as second:
        assert (second.url, second.root) == (first.url, first.root)
        async with aiohttp.ClientSession() as session:
            got = await get_manifest(session, second, "keep/me", "v1")
        assert got == (200, DOCKER_MANIFEST, image.manifest, image.manifest_digest)
    assert (workdir / "registry.prev.log").exists()


@pytest.mark.asyncio
async def test_skopeo_reads_pushed_images(registry: Registry, tmp_path: Path) -> None:
    docker = make_image(seed=9, flavour="docker")
    index = make_index([make_image(seed=10), make_image(seed=11, arch="arm64")])
    async with aiohttp.ClientSession() as session:
        await push_image(session, registry.url, "sk/docker", docker, "v1")
        await push_index(session, registry.url, "sk/multi", index, "v1")
    base = f"docker://127.0.0.1:{registry.port}"
    info = json.loads(await run_skopeo("inspect", "--tls-verify=false", f"{base}/sk/docker:v1"))
    assert info["Digest"] == docker.manifest_digest
    assert info["Layers"] == [b.digest for b in docker.layers]
    raw = await run_skopeo("inspect", "--raw", "--tls-verify=false", f"{base}/sk/multi:v1")
    assert raw.encode() == index.manifest
    # A full copy makes skopeo fetch and digest-verify every blob of one platform.
    await run_skopeo(
        "copy",
        "--src-tls-verify=false",
        "--override-arch=arm64",
        f"{base}/sk/multi:v1",
        f"dir:{tmp_path / 'copy'}",
    )
    arm = index.images[1]
    for blob in arm.blobs:
        assert (tmp_path / "copy" / blob.digest.removeprefix("sha256:")).read_bytes() == blob.data


@pytest.mark.asyncio
async def test_proxy_mode_pulls_through(tmp_path: Path) -> None:
    image = make_image(seed=12)
    with (
        running_registry(tmp_path / "upstream") as upstream,
        running_registry(tmp_path / "mirror", proxy_remote=upstream.url) as mirror,
    ):
        async with aiohttp.ClientSession() as session:
            await push_image(session, upstream.url, "library/thing", image, "v1")
            got = await get_manifest(session, mirror, "library/thing", "v1")
            assert got == (200, OCI_MANIFEST, image.manifest, image.manifest_digest)
            layer = image.layers[1]
            assert await get_blob(session, mirror, "library/thing", layer.digest) == layer.data
            # Proxy mode is read-only.
            url = f"{mirror.url}/v2/library/thing/blobs/uploads/"
            async with session.post(url, timeout=TIMEOUT) as resp:
                assert resp.status == 405
        # distribution 2.8 serves a miss from one upstream GET and, in parallel,
        # stores it from a second one: a single cold pull costs two.
        upstream.wait_for_requests(lambda rs: count_blob_gets(rs, layer.digest) >= 2)
        assert upstream.blob_gets(layer.digest) == 2
