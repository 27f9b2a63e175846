"""Attacks on serve --workers (the in-process pair of tests/workers/test_front.py): each test
here failed on the code it was written against."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import replace
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from proxy.core.authconfig import parse_auth
from proxy.core.config import Settings
from proxy.core.reference import Digest
from proxy.web import keys
from proxy.web.workerlink import REPORT_PATH
from proxy.workers import front, internal, supervisor
from tests.support.fake_upstream import FakeUpstream
from tests.support.rawhttp import open_raw, read_response
from tests.workers import test_front
from tests.workers.test_front import ACCEPT, StartPair, sent_by_worker, tag_fetched

start_pair = test_front.start_pair  # the in-process primary and worker


async def test_a_client_cannot_post_a_report_through_a_worker(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-pw', bcrypt.gensalt(4)).decode()}\n")
    auth = parse_auth("auth", {"htpasswd": str(htpasswd), "anonymous": False})
    pair = await start_pair({"docker.io": fake.url}, auth=auth)
    forged = {
        "requests": [["manifests", "hit", 200, "docker.io", 10**12, 10**15]],
        "pulls": [["docker.io", f"evil/{i}", "latest", "hit", 10**9] for i in range(100)],
    }
    # An anonymous client on the public port (a worker's): no credentials at all.
    async with session.post(f"{pair.worker_url}{REPORT_PATH}", data=json.dumps(forged)) as resp:
        status = resp.status
    top = pair.primary.app[keys.PULLS].top(1)
    assert not top or not top[0][0][1].startswith("evil/"), "a client's forged counts were taken"
    assert status == 404


def _key_bytes(key: object) -> int:
    if isinstance(key, str | bytes):
        return len(key)
    if isinstance(key, tuple):
        return sum(_key_bytes(k) for k in key)
    return 64


async def test_the_manifest_memo_counts_the_bytes_of_its_keys(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # The memo is "an LRU by bytes", but an entry is sized as 200 + its body: the key, which
    # holds every Accept header the client sent (and with auth, every Authorization), is not
    # counted. A client sending big, distinct Accept headers grows the worker without bound.
    pair, _, url = await tag_fetched(start_pair, fake, session, seed=901)  # then hits
    filler = "x" * 7000
    for n in range(20):
        headers = [("Accept", ACCEPT["Accept"])] + [
            ("Accept", f"application/{filler}{n}.{i}") for i in range(8)
        ]
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200
    memo = pair.front.manifests._entries
    held = sum(_key_bytes(k) + len(e.value.body) for k, e in memo.items())
    assert len(memo) == 21
    assert held <= memo.currsize, f"memo holds {held} bytes, accounts for {memo.currsize}"


async def test_a_wrong_password_on_a_blob_costs_one_attempt_through_a_worker_as_directly(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # The worker's probe (HEAD) carries the client's credentials, is refused by the primary's
    # guard before _probe marks it internal, and then the GET is relayed and refused again:
    # two guesses counted, two bcrypt checks, two 401s logged and counted, for one request.
    data = b"layer" * 1000
    digest = fake.add_blob(data)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-pw', bcrypt.gensalt(4)).decode()}\n")
    auth = parse_auth("auth", {"htpasswd": str(htpasswd), "anonymous": False, "max_failures": 4})
    pair = await start_pair({"docker.io": fake.url}, auth=auth)
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ci:wrong").decode()}
    statuses = []
    for _ in range(4):  # four guesses: all within the four allowed
        async with session.get(f"{pair.worker_url}/v2/library/app/blobs/{digest}", headers=wrong) as resp:
            statuses.append(resp.status)
    assert statuses == [401] * 4
    async with session.get(f"{pair.primary.url}/metrics") as resp:
        text = await resp.text()
    # Refused before routing (kind "other"), as the same request sent to the primary directly.
    refused = [
        x for x in text.splitlines() if x.startswith("ocicache_requests_total") and 'status="401"' in x
    ]
    assert refused == ['ocicache_requests_total{cache="-",kind="other",status="401",upstream="-"} 4.0']


async def test_an_evicted_blob_is_not_held_open_by_a_worker(
    start_pair: StartPair, fake: FakeUpstream, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker keeps a cached file's descriptor open while its confirmation lasts, and the
    # reporting loop closes those whose confirmation expired(). But Memo.get() deletes an
    # expired entry itself: when the next request finds it expired, the probe says "not
    # cached" (evicted), and nothing ever drops the descriptor. The evicted file's disk space
    # stays in use for as long as the worker lives (up to OpenFiles' 512 descriptors).
    monkeypatch.setattr(front, "REPORT_EVERY", 3600.0)  # the loop's drop is not what we test
    data = b"evict me" * 100_000
    digest = fake.add_blob(data)
    pair = await start_pair({"docker.io": fake.url})
    url = await sent_by_worker(pair, session, digest, data)  # from its own descriptor
    await pair.primary.app[keys.CACHE].remove(Digest.parse(digest))  # evicted
    fake._blobs.pop(digest)  # and upstream no longer has it
    pair.clock.now += internal.REUSE_MAX
    async with session.get(url) as resp:
        await resp.read()
    held = [e.fd for k, e in pair.front.files._entries.items() if k == digest]
    held += list(pair.front.files._dropped)
    deleted = [fd for fd in held if os.fstat(fd).st_nlink == 0]
    assert not deleted, "the worker still holds the evicted file open"


async def test_a_challenge_through_a_worker_names_the_address_the_client_reached(
    start_pair: StartPair, fake: FakeUpstream, tmp_path: Path
) -> None:
    # reached_at() falls back to the local socket's port when the Host header will not do. A
    # relayed request has no such port (the primary's end is a Unix socket), and a request with
    # no Host at all gets the one aiohttp's client invents for the relay: "ocicache".
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'ci-pw', bcrypt.gensalt(4)).decode()}\n")
    auth = parse_auth("auth", {"htpasswd": str(htpasswd), "anonymous": False})
    pair = await start_pair({"docker.io": fake.url}, auth=auth)
    port = int(pair.worker_url.rsplit(":", 1)[1])
    expected = f'Bearer realm="http://127.0.0.1:{port}/auth/token",service="ocicache"'
    for head in (b"GET /v2/ HTTP/1.0\r\n\r\n", b"GET /v2/ HTTP/1.1\r\nHost: not a host\r\n\r\n"):
        reader, writer = await open_raw(port)
        writer.write(head)
        resp = await read_response(reader)
        writer.close()
        assert resp is not None and resp.status == 401
        assert resp.header("WWW-Authenticate") == expected, head


class _FakeProc:
    def __init__(self) -> None:
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.stdin = None
        self.pid = 4242

    async def wait(self) -> int:
        await self.exited.wait()
        self.returncode = -9
        return -9

    def send_signal(self, sig: int) -> None:
        self.exited.set()

    def kill(self) -> None:
        self.exited.set()


async def test_a_worker_that_could_not_be_started_once_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Supervisor._watch calls _start -> Worker.start, which can raise (fork fails with EAGAIN
    # or ENOMEM: the very moment after an OOM kill; a broken pipe if the child dies at once).
    # Nothing catches it: the watch task ends with the exception, and that worker is never
    # started again, silently.
    monkeypatch.setattr(supervisor, "RESTART_MIN", 0.0)
    calls: list[str] = []
    third = asyncio.Event()
    procs: list[_FakeProc] = []

    async def start(self: supervisor.Worker, orders: object) -> bool:
        calls.append("start")
        if len(calls) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")  # fork: EAGAIN
        proc = _FakeProc()
        procs.append(proc)
        self.proc = proc  # type: ignore[assignment]
        self.started = 0.0
        if len(calls) == 3:
            third.set()
        return True

    monkeypatch.setattr(supervisor.Worker, "start", start)
    settings = replace(Settings(), cache_dir=tmp_path, workers=2)
    sup = supervisor.Supervisor(settings, str(tmp_path / "s.sock"), "asyncio", "secret")
    await sup.start(1)
    procs[0].exited.set()  # the worker dies (OOM); its restart fails once
    try:
        async with asyncio.timeout(10):  # a bound on the wait for the event, not a pace
            await third.wait()
    except TimeoutError:
        pass
    watch_errors = [t.exception() for t in sup._watches if t.done() and not t.cancelled()]
    await sup.stop()
    assert calls == ["start"] * 3, f"never started again; its watch ended with {watch_errors}"
