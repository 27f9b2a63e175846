"""The cold scenarios' shared parts (loadtests/cold.py): a blob seeded into a real registry's
storage is served like a pushed one, whole and in ranges; the settings file is one ocicache
reads; the request log is read for how each answer was served; and the fan-out engine, run on
that upstream behind a link that caps each connection, sees ocicache fetch a blob in several
ranged GETs that add up to the blob once. Counts and bytes only, no timings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp

from loadtests import cold, fanout
from loadtests.fixtures import REPO, blob_path, make_blob_file
from loadtests.shaper import MB
from proxy.core.config import load
from tests.support.registry import start_registry

MiB = 1024 * 1024


async def test_a_seeded_blob_is_served_whole_and_in_ranges(tmp_path: Path) -> None:
    file = tmp_path / "blob"
    digest = make_blob_file(file, 3 * MiB)
    cold.seed_registry(tmp_path / "upstream" / "storage", REPO, file, digest)
    registry = start_registry(tmp_path / "upstream")
    try:
        url = registry.url + blob_path(digest)
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                whole = await resp.read()
                assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == digest
            async with session.get(url, headers={"Range": f"bytes={MiB}-{2 * MiB - 1}"}) as resp:
                part = await resp.read()
                assert resp.status == 206
    finally:
        registry.stop()
    assert whole == file.read_bytes()
    assert part == whole[MiB : 2 * MiB]
    # A hard link: the registry's copy costs no disk.
    data = next((tmp_path / "upstream" / "storage").rglob("data"))
    assert os.stat(data).st_ino == os.stat(file).st_ino


def test_the_settings_file_is_one_ocicache_reads(tmp_path: Path) -> None:
    args = cold.config_args(tmp_path, {"fill_connections": 1, "fill_chunk": MiB, "lazy_range_gap": 2 * MiB})
    assert args[0] == "--config" and cold.config_args(tmp_path, {}) == ()

    settings = load(Path(args[1]), {})
    assert (settings.fill_connections, settings.fill_chunk, settings.lazy_range_gap) == (1, MiB, 2 * MiB)


def test_request_lines_say_how_each_answer_was_served() -> None:
    path = "/v2/library/bench/blobs/sha256:" + "a" * 64
    lines = [
        json.dumps({"event": "request", "path": path, "cache": "miss", "bytes": 100}),
        "not json " + path,
        json.dumps({"event": "request", "path": path, "cache": "lazy", "bytes": 40}),
        json.dumps({"event": "request", "path": "/v2/", "cache": "lazy", "bytes": 7}),
        json.dumps({"event": "fill_committed", "path": path, "cache": "lazy", "bytes": 9}),
        json.dumps({"event": "request", "path": path, "cache": "lazy", "bytes": 2}),
    ]
    found = cold.requests_in(lines, path)

    assert [f["cache"] for f in found] == ["miss", "lazy", "lazy"]
    assert cold.relayed_bytes(found) == 42


async def test_parallel_parts_behind_a_link_capping_each_connection_fetch_the_blob_once(
    tmp_path: Path,
) -> None:
    file = tmp_path / "blob"
    digest = make_blob_file(file, 6 * MiB)
    cold.seed_registry(tmp_path / "upstream" / "storage", REPO, file, digest)
    registry = start_registry(tmp_path / "upstream")
    # Thresholds cut so that a small blob is fetched in parts.
    settings = {"parallel_fill_threshold": 2 * MiB, "fill_chunk": MiB}
    config = fanout.BenchConfig(
        size=6 * MiB,
        clients=(1,),
        proxies=("ocicache", "distribution"),
        stalled=0,
        warm=False,
        ocicache_args=cold.config_args(tmp_path, settings),
        client_procs=1,
        repeat=1,
        upstream_rate=20 * MB,
        per_connection=True,
        deadline=120,
    )
    try:
        async with aiohttp.ClientSession() as session:
            report = await fanout.run_on(
                config, tmp_path / "runs", registry, fanout.BlobRef(digest, 6 * MiB), session, lambda _m: None
            )
    finally:
        registry.stop()

    ocicache, distribution = report.rows()
    assert (ocicache.proxy, distribution.proxy) == ("ocicache", "distribution")
    [gets] = ocicache.upstream_gets
    assert gets > 1  # several ranged GETs...
    assert report.upstream_ratios(ocicache) == [1.0]  # ...that add up to the blob once
    assert report.upstream_ratios(distribution) == [2.0]  # one to store it, one to stream it
    assert "for each connection on its own" in report.machine["link"]
