"""The catalogue and the disk agree after anything: a restart, a truncated file, a crash
between a rename and its row; LRU order and hit counts survive a restart; the cache
directory of the JSON-record release is migrated; one process writes a directory."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.core.mediatypes import OCI_MANIFEST, accept_key
from proxy.core.reference import Digest
from proxy.store.catalogue import BLOB, MANIFEST, Catalogue
from proxy.store.lock import CacheBusy, CacheLock
from proxy.store.migrate import answers_from_types
from proxy.store.storage import Storage
from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import DOCKER_LIST, DOCKER_MANIFEST, MANIFEST_ACCEPT, make_image

ROOT = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rows(cache: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(cache / "index.db")
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


async def test_a_blob_truncated_while_stopped_is_fetched_again_not_served_short(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    digest = fake.add_blob(data)
    cache = tmp_path / "cache"
    first = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    url = f"/v2/library/app/blobs/{digest}"
    async with session.get(first.url + url) as resp:
        assert await resp.read() == data
    await first.cached()
    await first.server.close()
    os.truncate(first.app[keys.STORAGE].blob_path(Digest.parse(digest)), 400)
    second = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    async with session.get(second.url + url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == data
    assert fake.count(method="GET", path_contains="/blobs/") == 2
    assert (await second.cached()) == {digest}


async def test_a_blob_truncated_while_serving_is_never_a_clean_short_body(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    digest = fake.add_blob(data)
    proxy = await start_proxy({"docker.io": fake.url})
    url = f"{proxy.url}/v2/library/app/blobs/{digest}"
    async with session.get(url) as resp:
        assert await resp.read() == data
    await proxy.cached()
    async with session.get(url) as resp:  # a warm hit, which keeps the descriptor open
        assert await resp.read() == data
    os.truncate(proxy.app[keys.STORAGE].blob_path(Digest.parse(digest)), 400)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(url) as resp:
            await resp.read()
    # ... and the next client gets it whole, fetched again.
    async with session.get(url) as resp:
        assert await resp.read() == data
    assert fake.count(method="GET", path_contains="/blobs/") == 2


async def test_reconcile_drops_rows_without_files_and_indexes_files_without_rows(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    storage.prepare()
    kept, orphan_file, orphan_row = b"kept" * 100, b"no row" * 100, b"no file" * 100
    catalogue = Catalogue(storage)
    await catalogue.open()
    for data in (kept, orphan_row):
        storage.put_bytes(Digest.parse(sha(data)), data)
        await catalogue.add_blob(sha(data), len(data))
    await catalogue.close()
    storage.remove(Digest.parse(sha(orphan_row)))
    storage.put_bytes(Digest.parse(sha(orphan_file)), orphan_file)  # a crash before its row
    again = Catalogue(storage)
    loaded = await again.open()
    assert set(again.blobs) == {sha(kept), sha(orphan_file)}
    assert again.blobs[sha(orphan_file)].kind == BLOB
    assert again.total == len(kept) + len(orphan_file)
    assert (loaded.indexed, loaded.dropped_rows) == (1, 1)
    await again.close()
    assert {r[0] for r in rows(tmp_path, "SELECT digest FROM blobs")} == {sha(kept), sha(orphan_file)}


async def test_lru_order_and_hit_counts_survive_a_restart(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    storage.prepare()
    blobs = [bytes([i]) * 100 for i in range(3)]
    catalogue = Catalogue(storage)
    await catalogue.open()
    for data in blobs:
        storage.put_bytes(Digest.parse(sha(data)), data)
        await catalogue.add_blob(sha(data), len(data))
    for _ in range(3):
        catalogue.touch(sha(blobs[0]))  # oldest becomes youngest
    await catalogue.close()
    again = Catalogue(storage)
    await again.open()
    assert list(again.blobs) == [sha(blobs[1]), sha(blobs[2]), sha(blobs[0])]
    assert again.blobs[sha(blobs[0])].hits == 3
    await again.close()


def write_old_record(records: Path, key: str, value: dict[str, object]) -> None:
    name = hashlib.sha256(key.encode()).hexdigest() + ".json"
    (records / name).write_text(json.dumps({**value, "key": key}))


async def test_a_cache_of_the_json_record_release_is_migrated_and_served_offline(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image = make_image(seed=90)
    cache = tmp_path / "cache"
    storage = Storage(cache)
    storage.prepare()
    (cache / "records").mkdir()
    for blob in image.blobs:
        storage.put_bytes(Digest.parse(blob.digest), blob.data)
    storage.put_bytes(Digest.parse(image.manifest_digest), image.manifest)
    records = cache / "records"
    write_old_record(records, f"manifest {image.manifest_digest}", {"media_type": OCI_MANIFEST})
    write_old_record(
        records,
        "tag docker.io library/app v1",
        {"types": {OCI_MANIFEST: {"digest": image.manifest_digest, "fetched": 1.0}}},
    )
    for blob in image.blobs:
        write_old_record(records, f"holder docker.io library/app {blob.digest}", {"holds": True})
    write_old_record(records, f"holder docker.io library/app {image.manifest_digest}", {"holds": True})
    (records / "garbage.json").write_text("{not json")
    # Offline, with an upstream that does not exist: only the migrated catalogue can answer.
    proxy = await start_proxy({"docker.io": "http://127.0.0.1:9"}, cache_dir=cache, offline=True)
    async with session.get(
        f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest
        assert resp.headers["Content-Type"] == OCI_MANIFEST
    for blob in image.blobs:
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{blob.digest}") as resp:
            assert resp.status == 200
            assert await resp.read() == blob.data
    assert not records.exists()
    catalogue = proxy.app[keys.CATALOGUE]
    assert catalogue.blobs[image.manifest_digest].kind == MANIFEST
    assert catalogue.manifests[image.manifest_digest].children == tuple(b.digest for b in image.blobs)


def test_old_tag_records_keep_serving_but_lose_their_poison() -> None:
    single = answers_from_types({OCI_MANIFEST: {"digest": "sha256:one", "fetched": 5.0}})
    assert single[accept_key(None)]["digest"] == "sha256:one"  # a tag that only had one manifest
    multi = answers_from_types(
        {
            DOCKER_MANIFEST: {"digest": "sha256:amd", "fetched": 9.0},
            DOCKER_LIST: {"digest": "sha256:list", "fetched": 5.0},
        }
    )
    # The amd64 entry of the old format no longer answers clients that accept the list.
    assert multi[accept_key(None)]["digest"] == "sha256:list"
    assert multi[accept_key(frozenset({DOCKER_MANIFEST}))]["digest"] == "sha256:amd"


async def test_one_process_writes_a_cache_directory(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    with pytest.raises(CacheBusy) as info:
        CacheLock(cache).acquire()
    assert f"pid {os.getpid()}" in str(info.value)
    # Another serve, and a writing command, refuse with a message naming the holder.
    for argv in (
        ["serve", "--listen", "127.0.0.1:0", "--cache-dir", str(cache)],
        ["verify", "--cache-dir", str(cache)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert done.returncode == 2, done.stderr
        assert f"in use by pid {os.getpid()}" in done.stderr
        assert "Traceback" not in done.stderr


async def cached_then_stopped(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    cache: Path,
    blobs: list[bytes],
) -> list[str]:
    """``blobs`` pulled through a proxy on ``cache``, committed, and that proxy stopped."""
    digests = [fake.add_blob(b) for b in blobs]
    first = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    for digest, blob in zip(digests, blobs, strict=True):
        async with session.get(f"{first.url}/v2/library/app/blobs/{digest}") as resp:
            assert await resp.read() == blob
    await first.cached()
    await first.server.close()
    return digests


async def test_the_start_up_size_check_drops_what_changed_behind_our_back(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    digests = await cached_then_stopped(
        start_proxy, fake, session, cache, [os.urandom(1000 + i) for i in range(3)]
    )
    storage = Storage(cache)
    os.truncate(storage.blob_path(Digest.parse(digests[0])), 10)
    with open(storage.blob_path(Digest.parse(digests[1])), "ab") as f:
        f.write(b"grown")
    second = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await second.app[keys.CACHE].checked()
    assert set(second.app[keys.CATALOGUE].blobs) == {digests[2]}
    assert await second.cached() == {digests[2]}


async def test_a_directory_where_a_blob_was_is_dropped_by_the_size_check_and_left_alone(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    digests = await cached_then_stopped(
        start_proxy, fake, session, cache, [os.urandom(1000 + i) for i in range(2)]
    )
    path = Storage(cache).blob_path(Digest.parse(digests[0]))
    path.unlink()
    path.mkdir()  # not a file of ours: not served, not deleted, no row kept for it
    second = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await second.app[keys.CACHE].checked()
    assert set(second.app[keys.CATALOGUE].blobs) == {digests[1]}
    assert path.is_dir()


async def test_a_blob_fetched_again_while_the_size_check_runs_keeps_its_row(
    start_proxy: StartProxy,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The check's pass over the files takes seconds in a big cache: a blob it found missing
    # may be back (fetched again) by the time it acts. Its new row must stay.
    blob = os.urandom(2000)
    cache = tmp_path / "cache"
    (digest,) = await cached_then_stopped(start_proxy, fake, session, cache, [blob])
    # What the pass saw: no file (it was gone when the pass read the directory).
    monkeypatch.setattr(Storage, "sizes", lambda self, digests: {})
    second = await start_proxy({"docker.io": fake.url}, cache_dir=cache)
    await second.app[keys.CACHE].checked()
    assert digest in second.app[keys.CATALOGUE].blobs
    gets = len(fake.seen)
    async with session.get(f"{second.url}/v2/library/app/blobs/{digest}") as resp:
        assert await resp.read() == blob
    assert len(fake.seen) == gets  # served from the cache, not fetched again
