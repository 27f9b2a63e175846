"""Second attack on serve --workers (the in-process pair of tests/workers/test_front.py):
each test here failed on the code it was written against."""

from __future__ import annotations

import os

import aiohttp

from proxy.core.reference import Digest
from proxy.web import keys
from proxy.workers import internal
from tests.support.fake_upstream import FakeUpstream
from tests.workers import test_front
from tests.workers.test_front import StartPair, sent_by_worker

start_pair = test_front.start_pair  # the in-process primary and worker


async def test_a_blob_purged_and_fetched_again_is_not_sent_from_the_old_file_by_a_busy_worker(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # The worker keeps one descriptor per digest (OpenFiles, keyed by name) and lets it go
    # only when its confirmation ends with nobody confirming it again (let_go each second).
    # A purge followed by a new download puts a new file (new inode) under the same name; a
    # probe then succeeds (same size), the hold is renewed, and acquire() hands back the
    # descriptor of the purged file. Under steady traffic the worker sends the deleted file
    # for ever, and its disk space is never freed; the primary sends the new one.
    data = b"layer v1 " * 100_000
    digest = fake.add_blob(data)
    pair = await start_pair({"docker.io": fake.url})
    url = await sent_by_worker(pair, session, digest, data)  # from its own descriptor
    await pair.primary.app[keys.CACHE].remove(Digest.parse(digest), purge=True)
    async with session.get(f"{pair.primary.url}/v2/library/app/blobs/{digest}") as resp:
        assert await resp.read() == data  # fetched again: a new file under the same name
    await pair.primary.cached()
    path = pair.primary.app[keys.STORAGE].blob_path(Digest.parse(digest))
    # Requests every half second; the reporting loop's let_go() ticks once a second, between.
    for _ in range(6):
        pair.clock.now += internal.REUSE_MAX / 2
        async with session.get(url) as resp:
            assert await resp.read() == data
        pair.clock.now += internal.REUSE_MAX / 4
        pair.front.let_go()
        pair.clock.now += internal.REUSE_MAX / 4
        async with session.get(url) as resp:
            assert await resp.read() == data
    assert pair.log.lines[-1]["cache"] == "hit"
    held = [e.fd for k, e in pair.front.files._entries.items() if k == digest]
    current = os.stat(path).st_ino
    stale = [fd for fd in held if os.fstat(fd).st_ino != current]
    assert not stale, "after 3 s the busy worker still sends (and holds) the purged file"
