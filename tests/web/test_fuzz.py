"""A fuzz run against the live app: thousands of generated raw requests (tests/support/fuzz.py)
at two proxies, one open and one checking credentials, in front of a healthy fake upstream.

What must hold for every one: an answer (a connection is never dropped without one); only 2xx,
3xx and 4xx (the upstream is healthy, so a 5xx is the proxy's own failure); every error body
the OCI envelope; every blob or manifest body served the bytes of its digest (whole, one range,
or each part of a multipart answer); no error logged. And after the run: both proxies still
serve a clean pull, nothing outside their cache directories was touched (the tree around them
is snapshotted, canaries included), and each cache holds only verified blobs in its layout.

Bounded: ``OCICACHE_FUZZ_CASES`` cases (default 3000) from ``OCICACHE_FUZZ_SEED`` (default
fixed, so a failure repeats), a few connections at a time, each answer awaited for at most
30 s and the whole run for at most 5 minutes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bcrypt
import structlog

from proxy.core.authconfig import parse_auth
from proxy.core.errors import Code
from tests.conftest import Proxy, StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.fuzz import Case, Generator, Target
from tests.support.images import MANIFEST_ACCEPT, make_image, make_index
from tests.support.rawhttp import RawResponse, multipart_parts, open_raw, read_response

CASES = int(os.environ.get("OCICACHE_FUZZ_CASES", "3000"))
SEED = int(os.environ.get("OCICACHE_FUZZ_SEED", "1313"))
CONCURRENCY = 12
ANSWER_TIMEOUT = 30.0
RUN_TIMEOUT = 300.0
USER, PASSWORD, TOKEN = "ci", "ci-fuzz-password", "robot-token-0123456789abcdef"
CODES = frozenset(c.value for c in Code)
# What a cache directory may hold (the catalogue's WAL files included).
CACHE_ENTRIES = frozenset({"blobs", "tmp", "index.db", "index.db-wal", "index.db-shm", "lock"})


@dataclass
class Run:
    content: dict[str, bytes]  # digest -> bytes, of everything the upstream holds
    failures: list[str]
    answers: dict[int, int]  # status -> count

    def fail(self, case: Case, what: str) -> None:
        self.failures.append(f"{what}\n    {case.shown()}")


def check(run: Run, case: Case, method: str, resp: RawResponse) -> None:
    run.answers[resp.status] = run.answers.get(resp.status, 0) + 1
    if not 200 <= resp.status < 500:
        run.fail(case, f"status {resp.status}: {resp.body[:300]!r}")
        return
    if b"Traceback" in resp.body:
        run.fail(case, "a traceback in the body")
    if resp.status >= 400:
        if method != "HEAD":
            try:
                codes = resp.oci_error_codes()
            except ValueError:
                run.fail(case, f"{resp.status} without the OCI envelope: {resp.body[:300]!r}")
                return
            if not set(codes) <= CODES:
                run.fail(case, f"unknown error codes {codes}")
        return
    digest = resp.header("Docker-Content-Digest")
    if digest is None or method == "HEAD":
        return
    data = run.content.get(digest)
    if data is None:
        run.fail(case, f"served {digest}, which upstream never held")
        return
    if resp.status == 200:
        if resp.body != data:
            run.fail(case, f"200 for {digest} with other bytes ({len(resp.body)} of {len(data)})")
    elif resp.status == 206:
        if (resp.header("Content-Type") or "").startswith("multipart/byteranges"):
            try:
                parts = multipart_parts(resp)
            except ValueError as exc:
                run.fail(case, f"multipart answer malformed: {exc}")
                return
        else:
            parts = [(resp.header("Content-Range") or "", resp.body)]
        for content_range, body in parts:
            match = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)", content_range)
            if match is None or int(match.group(3)) != len(data):
                run.fail(case, f"206 with Content-Range {content_range!r}")
                continue
            first, last = int(match.group(1)), int(match.group(2))
            if body != data[first : last + 1]:
                run.fail(case, f"206 for {digest} {content_range} with other bytes")


async def exchange(run: Run, port: int, case: Case) -> None:
    reader, writer = await open_raw(port)
    answered = 0
    try:
        writer.write(case.data)
        await writer.drain()
        async with asyncio.timeout(ANSWER_TIMEOUT):
            for method in case.methods:
                resp = await read_response(reader, head=method == "HEAD")
                if resp is None:
                    break
                answered += 1
                check(run, case, method, resp)
        if answered == 0:
            run.fail(case, "the connection ended without an answer")
    except TimeoutError:
        run.fail(case, f"no answer in {ANSWER_TIMEOUT:.0f} s")
    except (asyncio.IncompleteReadError, ValueError) as exc:
        run.fail(case, f"answer cut short or unreadable: {exc!r}")
    except (ConnectionResetError, BrokenPipeError):
        # The proxy answered and closed while we were still sending a long pipeline: the
        # kernel resets such a connection and may drop the answer with it. Counted, not failed.
        run.answers[-1] = run.answers.get(-1, 0) + 1
    finally:
        writer.close()


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int, int]]:
    """Every file and directory under root (but those in skip): mode, size, mtime."""

    def walk(path: Path) -> Iterator[Path]:
        for child in path.iterdir():
            if child in skip:
                continue
            yield child
            if child.is_dir() and not child.is_symlink():
                yield from walk(child)

    return {
        str(p.relative_to(root)): (st.st_mode, st.st_size, st.st_mtime_ns)
        for p in walk(root)
        for st in [p.lstat()]
    }


def check_cache(cache: Path) -> None:
    assert {p.name for p in cache.iterdir()} <= CACHE_ENTRIES
    assert list((cache / "tmp").iterdir()) == []
    for alg in (cache / "blobs").iterdir():
        assert alg.name in ("sha256", "sha512")
        for blob in alg.iterdir():
            assert hashlib.new(alg.name, blob.read_bytes()).hexdigest() == blob.name


async def clean_pull(session: aiohttp.ClientSession, proxy: Proxy, run: Run, tags: dict[str, str]) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    for tag, digest in tags.items():
        url = f"{proxy.url}/v2/library/app/manifests/{tag}"
        async with session.get(url, headers={"Accept": MANIFEST_ACCEPT, **auth}) as resp:
            assert resp.status == 200
            assert await resp.read() == run.content[digest]
    for digest, data in run.content.items():
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{digest}", headers=auth) as resp:
            if resp.status == 404:  # a manifest: never served as a blob
                continue
            assert resp.status == 200, digest
            assert await resp.read() == data


async def test_thousands_of_hostile_requests_get_only_4xx_or_right_bytes(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    images = [make_image(layer_sizes=(3000, 70_000), seed=1313), make_image(layer_sizes=(200,), seed=1314)]
    index = make_index(images)
    tags = {
        "v1": fake.add_manifest("library/app", index.manifest, index.media_type, tag="v1"),
        "img": fake.add_image("library/app", images[0], tag="img"),
    }
    fake.add_image("library/app", images[1], tag="small")
    tags["small"] = images[1].manifest_digest
    content = {index.digest: index.manifest}
    for image in images:
        content[image.manifest_digest] = image.manifest
        content |= {b.digest: b.data for b in image.blobs}
    target = Target(
        repo="library/app",
        tag="v1",
        manifests=[index.digest, *(i.manifest_digest for i in images)],
        blobs=[b.digest for i in images for b in i.blobs],
        users=[(USER, PASSWORD)],
        tokens=[TOKEN],
    )

    # The proxies' directories sit among files they must leave alone.
    root = tmp_path / "root"
    (root / "outside").mkdir(parents=True)
    (root / "outside" / "canary").write_text("untouched")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    (root / "tokens").write_text(f"robot:{TOKEN}\n")
    caches = [root / "open-cache", root / "guarded-cache"]
    for cache in caches:
        cache.mkdir()  # so that making them does not count as touching root
    before = snapshot(tmp_path, set(caches))

    upstreams = {"docker.io": fake.url, "ghcr.io": fake.url}
    open_proxy = await start_proxy(upstreams, cache_dir=caches[0])
    auth = parse_auth(
        "auth",
        {
            "htpasswd": str(htpasswd),
            "tokens_file": str(root / "tokens"),
            "anonymous": True,
            "rules": [{"anonymous": True, "upstreams": ["docker.io"]}, {"users": ["*"]}],
            # Every guess from this one address counts: keep the guard checking, not refusing.
            "max_failures": 1_000_000,
        },
    )
    guarded = await start_proxy(upstreams, cache_dir=caches[1], auth=auth)
    ports = [open_proxy.server.port or 0, guarded.server.port or 0]

    run = Run(content, [], {})
    generator = Generator(target, SEED)
    cases = [generator.case(i) for i in range(CASES)]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int, case: Case) -> None:
        async with limit:
            await exchange(run, ports[i % 2], case)

    with structlog.testing.capture_logs() as logged:
        async with asyncio.timeout(RUN_TIMEOUT):
            await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
        for proxy in (open_proxy, guarded):
            await clean_pull(session, proxy, run, tags)
            await proxy.cached()

    assert not run.failures, f"{len(run.failures)} of {CASES} failed:\n" + "\n".join(run.failures[:15])
    errors = [e for e in logged if e.get("log_level") in ("error", "critical")]
    assert errors == [], errors[:5]
    # The run exercised what it means to: answers of each kind, and content served.
    assert {200, 206, 400, 401, 404, 405, 416} <= set(run.answers), run.answers
    assert snapshot(tmp_path, set(caches)) == before
    for cache in caches:
        check_cache(cache)
