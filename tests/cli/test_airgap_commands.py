"""The air-gap commands as a user runs them: real processes, a cache directory, the fake
upstream on loopback (the commands reach it as any registry)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.images import Image, make_image, make_index
from tests.support.proxyproc import ROOT, serving

TIMEOUT = 120.0


async def cli(*args: str, stdin: int | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def where(cache: Path, fake: FakeUpstream) -> list[str]:
    return ["--cache-dir", str(cache), "--upstream", f"docker.io={fake.url}"]


def publish(fake: FakeUpstream) -> tuple[Image, Image, Image]:
    single = make_image(layer_sizes=(4096, 30_000), seed=61)
    amd, arm = make_image(seed=62), make_image(arch="arm64", seed=63)
    fake.add_image("library/single", single, tag="v1")
    for img in (amd, arm):
        fake.add_image("library/multi", img)
    index = make_index([amd, arm])
    fake.add_manifest("library/multi", index.manifest, index.media_type, tag="v2")
    return single, amd, arm


async def test_prefetch_prints_a_line_per_blob_then_a_summary_and_names_failures(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    single, amd, arm = publish(fake)
    cache = tmp_path / "cache"
    listing = tmp_path / "refs.txt"
    listing.write_text("# what the site needs\nsingle:v1  # the app\n\ndocker.io/library/multi:v2\n")
    code, out, err = await cli("prefetch", "--file", str(listing), *where(cache, fake))
    assert code == 0, err
    lines = out.splitlines()
    blobs = [*single.blobs, *amd.blobs, *arm.blobs]
    for blob in blobs:
        assert sum(1 for line in lines if line.startswith("fetched") and blob.digest in line) == 1
    assert lines[-1].startswith("2 references; 9 blobs fetched")
    code, out, _ = await cli("prefetch", "single:v1", "nothere:v1", *where(cache, fake))
    assert code == 1
    assert "failed: docker.io/library/nothere:v1: MANIFEST_UNKNOWN" in out
    assert out.splitlines()[-1].startswith("2 references (1 failed); 0 blobs fetched")
    assert "already cached" in out.splitlines()[-1]

    code, _, err = await cli("prefetch", "quay.io/org/app:1", *where(cache, fake))
    assert code == 2 and "registry 'quay.io' is not configured" in err
    code, _, err = await cli("prefetch", "--platform", "linux", "single:v1", *where(cache, fake))
    assert code == 2 and "not a platform" in err


async def test_export_import_ls_rm(fake: FakeUpstream, tmp_path: Path) -> None:
    publish(fake)
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    archive = tmp_path / "site.tar.zst"
    # Nothing cached yet: export prefetches what it lacks.
    code, out, err = await cli(
        "export", "--output", str(archive), "single:v1", "multi:v2", *where(cache, fake)
    )
    assert code == 0, err
    assert out.splitlines()[-1].startswith("exported 2 references, 13 blobs")
    code, out, err = await cli("import", str(archive), *where(fresh, fake))
    assert code == 0, err
    assert "served docker.io/library/single:v1" in out and "served docker.io/library/multi:v2" in out
    assert out.splitlines()[-1].startswith("imported 2 references (2 served)")

    code, out, _ = await cli("ls", "--json", *where(fresh, fake))
    doc = json.loads(out)
    refs = {i["reference"]: i for i in doc["images"]}
    assert set(refs) == {"docker.io/library/single:v1", "docker.io/library/multi:v2"}
    assert refs["docker.io/library/multi:v2"]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert doc["blobs"] == 13  # manifests are files too
    code, out, _ = await cli("ls", *where(fresh, fake))
    assert out.splitlines()[0].split() == [
        "REFERENCE",
        "DIGEST",
        "PLATFORMS",
        "SIZE",
        "LAST",
        "PULLED",
        "PINNED",
    ]
    assert out.splitlines()[-1].startswith("2 images; 13 blobs")

    # Nothing offline to fetch from: a missing reference is named, nothing written.
    code, _, err = await cli(
        "export", "--offline", "--output", str(tmp_path / "x.tar"), "absent:v1", *where(fresh, fake)
    )
    assert code == 1 and "docker.io/library/absent:v1: not cached" in err
    assert not (tmp_path / "x.tar").exists()

    code, out, _ = await cli("rm", "multi:v2", *where(fresh, fake))
    assert code == 0
    assert out.splitlines()[-1].startswith("removed 1 image; freed 9 blobs")
    code, out, _ = await cli("rm", "--repository", "docker.io/library/single", "gone:v1", *where(fresh, fake))
    assert code == 1 and "no such image: docker.io/library/gone:v1" in out
    code, out, _ = await cli("ls", "--json", *where(fresh, fake))
    assert json.loads(out) == {"images": [], "blobs": 0, "bytes": 0, "budget": json.loads(out)["budget"]}


async def test_rm_keeps_a_blob_another_image_needs(fake: FakeUpstream, tmp_path: Path) -> None:
    image = make_image(seed=64)
    fake.add_image("library/one", image, tag="v1")
    fake.add_image("library/one", image, tag="v2")
    cache = tmp_path / "cache"
    assert (await cli("prefetch", "one:v1", "one:v2", *where(cache, fake)))[0] == 0
    code, out, _ = await cli("rm", "one:v1", *where(cache, fake))
    assert (code, out.splitlines()[-1]) == (0, "removed 1 image; freed 0 blobs, 0 B")
    _, out, _ = await cli("ls", "--json", *where(cache, fake))
    assert [i["reference"] for i in json.loads(out)["images"]] == ["docker.io/library/one:v2"]
    _, out, _ = await cli("rm", "--unused-for", "0s", *where(cache, fake))
    assert out.splitlines()[-1].startswith(f"removed 1 image; freed {1 + len(image.blobs)} blobs")


async def test_commands_refuse_a_directory_a_running_serve_holds(fake: FakeUpstream, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    async with serving(cache, {"docker.io": fake.url}) as proxy:
        for args in (["ls"], ["prefetch", "x:1"], ["rm", "x:1"], ["import", str(tmp_path)]):
            code, _, err = await cli(*args, *where(cache, fake))
            assert code == 2, (args, err)
            assert f"in use by pid {proxy.proc.pid}" in err


async def test_a_kill_9_during_import_leaves_a_consistent_cache_and_no_temp_file(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    publish(fake)
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    archive = tmp_path / "site.tar"
    assert (await cli("export", "-o", str(archive), "single:v1", "multi:v2", *where(cache, fake)))[0] == 0
    data = archive.read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for part in (len(data) // 10, len(data) // 2, len(data) - 2048, len(data)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "import", str(fifo), *where(fresh, fake),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        # Writing blocks until the importer has read it: then it is mid-import.
        await asyncio.to_thread(_feed, fifo, data[:part])
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # The next command sweeps what the killed one left, and finds rows and files agreeing.
        code, out, err = await cli("ls", "--json", *where(fresh, fake))
        assert code == 0, err
        assert not list((fresh / "tmp").iterdir())
        assert (await cli("verify", "--cache-dir", str(fresh)))[0] == 0
    code, out, err = await cli("import", str(archive), *where(fresh, fake))
    assert code == 0, err
    code, out, _ = await cli("ls", "--json", *where(fresh, fake))
    assert json.loads(out)["blobs"] == 13


def _feed(fifo: Path, data: bytes) -> None:
    with open(fifo, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("args", [["export", "-o", "/tmp/never.tar"], ["rm"], ["prefetch"]])
async def test_commands_say_what_they_need(args: list[str], tmp_path: Path) -> None:
    code, _, err = await cli(*args, "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and err.strip()
