"""The air-gap round trip with real parts, as the README walks it.

A real docker-registry upstream; ``ocicache prefetch`` of a single-platform image and a
two-platform OCI index; ``ocicache export`` to a .tar.zst and a .tar; ``ocicache import`` into
fresh cache directories; the registry stopped (no upstream process exists); ``ocicache serve
--offline`` on the imported cache, pulled by skopeo, by dockerd through registry-mirrors and by
ctr for linux/arm64 of the index: every digest as upstream had it. Also: skopeo and ctr read
the export directly, and a bit-flipped archive is refused on import.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp

from tests.support.containerd import Containerd
from tests.support.dockerd import Blackhole, offline_env
from tests.support.images import Image, Index, make_image, make_index, push_image, push_index
from tests.support.layout import layout_blobs
from tests.support.proxyproc import ROOT, serving
from tests.support.registry import Registry
from tests.system.test_clients import (
    HOST_ARCH,
    OTHER_ARCH,
    blocking,
    ctr_pull,
    docker,
    dockerd_with,
    image_id,
    run_tool,
)

TIMEOUT = 300.0
SINGLE, MULTI = "docker.io/library/single:v1", "docker.io/library/multi:v2"


async def ocicache(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def assert_image(blobs: dict[str, bytes], image: Image) -> None:
    assert blobs[image.manifest_digest] == image.manifest
    for blob in image.blobs:
        assert blobs[blob.digest] == blob.data


async def skopeo(src: str, dest: Path, env: dict[str, str], *extra: str) -> dict[str, bytes]:
    code, out = await run_tool("skopeo", "copy", *extra, src, f"oci:{dest}", env=env)
    assert code == 0, out
    return layout_blobs(dest)


async def setup(session: aiohttp.ClientSession, url: str, what: str) -> str:
    async with session.get(f"{url}/setup/{what}") as resp:
        text = await resp.text()
        assert resp.status == 200, text
        return text


async def test_prefetch_export_import_then_serve_offline_to_real_clients(
    registry: Registry, containerd: Containerd, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    single = make_image(layer_sizes=(4096, 200_000), arch=HOST_ARCH, seed=901)
    native = make_image(layer_sizes=(4096, 30_000), arch=HOST_ARCH, seed=902)
    other = make_image(layer_sizes=(4096, 40_000), arch=OTHER_ARCH, seed=903)
    index: Index = make_index([native, other])
    await push_image(session, registry.url, "library/single", single, tag="v1")
    await push_index(session, registry.url, "library/multi", index, tag="v2")
    connected = tmp_path / "connected"
    up = ["--upstream", f"docker.io={registry.url}"]

    # 1. Fill a cache while connected.
    code, out = await ocicache("prefetch", "single:v1", MULTI, "--cache-dir", str(connected), *up)
    assert code == 0, out
    assert "2 references; 9 blobs fetched" in out.splitlines()[-1]

    # 2. Carry it: two archives.
    zst, tar = tmp_path / "site.tar.zst", tmp_path / "site.tar"
    for archive in (zst, tar):
        code, out = await ocicache(
            "export", "-o", str(archive), SINGLE, MULTI, "--cache-dir", str(connected), *up
        )
        assert code == 0, out
        assert out.splitlines()[-1].startswith("exported 2 references, 13 blobs")

    # Also: a flipped bit is refused, and leaves nothing behind.
    flipped = tmp_path / "flipped.tar.zst"
    data = bytearray(zst.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    refused = tmp_path / "refused"
    code, out = await ocicache("import", str(flipped), "--cache-dir", str(refused), *up)
    assert code == 1 and "refused, nothing imported" in out, out
    assert not [p for p in (refused / "blobs").rglob("*") if p.is_file()]

    # 3. Import into fresh cache directories (one from each archive).
    site, site_tar = tmp_path / "site", tmp_path / "site-tar"
    for archive, cache in ((zst, site), (tar, site_tar)):
        code, out = await ocicache("import", str(archive), "--cache-dir", str(cache), *up)
        assert code == 0, out
        assert f"served {SINGLE} {single.manifest_digest}" in out
        assert f"served {MULTI} {index.digest}" in out

    # What skopeo makes imports too: an oci-archive and an oci: layout directory.
    from_skopeo = tmp_path / "from-skopeo"
    plain = offline_env(None)
    src = f"docker://127.0.0.1:{registry.port}"
    code, out = await run_tool(
        "skopeo", "copy", "--src-tls-verify=false", f"{src}/library/single:v1",
        f"oci-archive:{tmp_path / 'skopeo.tar'}:{SINGLE}", env=plain,
    )  # fmt: skip
    assert code == 0, out
    code, out = await run_tool(
        "skopeo", "copy", "--all", "--src-tls-verify=false", f"{src}/library/multi:v2",
        f"oci:{tmp_path / 'skopeo-dir'}:{MULTI}", env=plain,
    )  # fmt: skip
    assert code == 0, out
    for source in (tmp_path / "skopeo.tar", tmp_path / "skopeo-dir"):
        code, out = await ocicache("import", str(source), "--cache-dir", str(from_skopeo), *up)
        assert code == 0, out
        assert "served docker.io/library/" in out

    # 4. No upstream process exists any more.
    await blocking(registry.stop)
    assert registry.proc.poll() is not None

    blackhole = Blackhole()
    env = offline_env(blackhole)
    try:
        # Also: skopeo (both archives) and ctr read the export itself.
        for archive in (tar, zst):
            got = await skopeo(f"oci-archive:{archive}:{SINGLE}", tmp_path / f"{archive.name}-single", env)
            assert_image(got, single)
            got = await skopeo(
                f"oci-archive:{archive}:{MULTI}", tmp_path / f"{archive.name}-multi", env, "--all"
            )
            assert got[index.digest] == index.manifest
            for image in (native, other):
                assert_image(got, image)
        imported = await blocking(
            containerd.ctr, "images", "import", "--all-platforms", str(tar), timeout=TIMEOUT
        )
        assert imported.returncode == 0
        assert await blocking(containerd.image_target, SINGLE) == single.manifest_digest
        assert await blocking(containerd.image_target, MULTI) == index.digest
        await blocking(containerd.ctr, "images", "rm", "--sync", SINGLE, MULTI, timeout=TIMEOUT)

        for cache in (site, site_tar, from_skopeo):
            async with serving(cache, {"docker.io": registry.url}, "--offline") as proxy:
                assert "offline" in proxy.banner
                base = f"docker://{proxy.host}"
                tls = "--src-tls-verify=false"
                got = await skopeo(f"{base}/library/single:v1", tmp_path / f"{cache.name}-single", env, tls)
                assert_image(got, single)
                got = await skopeo(
                    f"{base}/library/multi:v2", tmp_path / f"{cache.name}-multi", env, tls, "--all"
                )
                assert got[index.digest] == index.manifest
                for image in (native, other):
                    assert_image(got, image)
                if cache is not site:
                    continue

                # 5. dockerd through registry-mirrors, and ctr for linux/arm64 of the index.
                daemon_json = json.loads(await setup(session, proxy.url, "docker"))
                async with dockerd_with(tmp_path / "docker", daemon_json) as daemon:
                    await docker(daemon, "pull", "single:v1")
                    assert await image_id(daemon, "single:v1") == single.config.digest
                    await docker(daemon, "pull", "multi:v2")
                    assert await image_id(daemon, "multi:v2") == native.config.digest
                hosts = tmp_path / "hosts"
                (hosts / "docker.io").mkdir(parents=True)
                toml = await setup(session, proxy.url, "containerd?registry=docker.io")
                (hosts / "docker.io" / "hosts.toml").write_text(toml)
                arm_ref = MULTI
                await ctr_pull(containerd, arm_ref, hosts, "linux/arm64")
                assert await blocking(containerd.image_target, arm_ref) == index.digest
                arm = other if OTHER_ARCH == "arm64" else native
                have = await blocking(containerd.content_digests)
                assert {index.digest, arm.manifest_digest, *(b.digest for b in arm.blobs)} <= have
    finally:
        blackhole.close()
