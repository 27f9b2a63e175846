"""A front worker's app: warm answers from what the primary said may be reused, everything
else relayed to the primary (see :mod:`proxy.workers`).

It holds no catalogue and starts no download. What it serves itself:

* a manifest answer the primary marked reusable, for the same request, until its time is up;
* a cached blob, from the cache directory's file, once the primary has answered a probe for
  it (this repository may read it; the file is whole, of this size) within the last second.
  The file is opened as the primary opens it (a regular file, no symlink) and its size checked
  again; one that shrinks while sent cuts the client off, as the primary does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web
from cachetools import LRUCache
from multidict import CIMultiDict

from proxy.core.config import Settings
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import MANIFEST_MAX
from proxy.core.reference import Digest, Kind, parse_path
from proxy.core.routing import route
from proxy.store.openfiles import OpenFiles
from proxy.store.storage import Storage
from proxy.web import keys
from proxy.web.accesslog import AccessLog
from proxy.web.answered import Handler, answer, answered
from proxy.web.blobs import Body, abort, send_body
from proxy.web.runner import take_connection_stats
from proxy.web.zerocopy import FileShrunk
from proxy.workers import internal
from proxy.workers.memo import Memo
from proxy.workers.relay import Relay
from proxy.workers.tally import Tally

log = structlog.get_logger("ocicache.worker")

# How often the worker reports its counts and lets go of files it no longer may send.
REPORT_EVERY: Final = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    upstream: str
    repository: str
    reference: Digest | str | None


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes
    headers: tuple[tuple[str, str], ...]
    user: str | None
    source: str  # what the primary would call answering it again: hit, or offline


class Front:
    def __init__(
        self,
        settings: Settings,
        socket_path: str,
        access: AccessLog,
        index: int = 1,
        secret: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.index = index
        self.access = access
        self.secret = secret  # what the primary takes a report with
        self.clock = clock
        self.storage = Storage(settings.cache_dir)
        self.files = OpenFiles()
        self.manifests: Memo[tuple[Any, ...], Answer] = Memo(clock=clock)
        self.blobs: Memo[tuple[Any, ...], tuple[int, str | None]] = Memo(clock=clock)
        # With client auth: credentials the primary accepted within the last second. Only
        # those are sent with a probe: a guess must cost one attempt, as it does directly.
        self.accepted: Memo[tuple[str, ...], bool] = Memo(clock=clock)
        # Cached files this worker may hold open, until when (its last confirmation's end).
        self._held: dict[str, float] = {}
        self.tally = Tally()
        self._resolved: LRUCache[tuple[str, str | None], Target | None] = LRUCache(maxsize=8192)
        self._names = [u.name for u in settings.upstreams]
        self.primary = Relay(socket_path, index, settings.idle_timeout)
        # The runner serving this app, once set up: its connections go in the reports.
        self.runner: web.BaseRunner | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        await self.primary.open()

    async def close(self) -> None:
        await self.report()
        await self.primary.close()
        self.files.close()
        self.access.flush()

    async def reporting(self) -> None:
        """Every second: send the counts, and close the files no longer confirmed."""
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.let_go()
            self.manifests.expired()
            self.blobs.expired()
            self.accepted.expired()
            await self.report()

    def let_go(self) -> None:
        """Close the cached files whose confirmation has ended: one evicted meanwhile frees
        its disk space only once nobody holds it open."""
        now = self.clock()
        for name in [n for n, until in self._held.items() if now >= until]:
            del self._held[name]
            self.files.drop(name)

    async def report(self) -> None:
        if not self.primary.open_:
            return
        # Sent even when nothing was answered: the connections held are news too.
        connections, refused = (0, {}) if self.runner is None else take_connection_stats(self.runner)
        await self.primary.report(self.tally.take(connections, refused), self.secret)

    # --- requests ---------------------------------------------------------------------------

    def resolve(self, request: web.Request) -> Target | None:
        """What a registry request asks for, as the primary would route it; None for anything
        else (the primary answers it, errors included)."""
        key = (request.rel_url.raw_path, request.query.get("ns"))
        if key in self._resolved:
            return self._resolved[key]
        target: Target | None = None
        if key[0].startswith("/v2/") and key[0] != "/v2/":
            try:
                parsed = parse_path(key[0])
                where = route(parsed.name, key[1], self._names, self.settings.default_upstream.name)
            except OciError:
                pass
            else:
                target = Target(parsed.kind, where.upstream, where.repository, parsed.reference)
        self._resolved[key] = target
        return target

    def _credentials(self, request: web.Request) -> tuple[str, ...]:
        # With client auth an answer is reused only for the very credentials it was given to.
        return tuple(request.headers.getall("Authorization", [])) if self.settings.auth.enabled else ()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(internal.PATHS):
            raise OciError(Code.NAME_UNKNOWN, "no such endpoint")  # the primary's and ours only
        target = self.resolve(request) if request.method in ("GET", "HEAD") else None
        if target is not None and target.kind is Kind.MANIFEST:
            key = (
                target.upstream,
                target.repository,
                str(target.reference),
                tuple(request.headers.getall("Accept", [])),
                self._credentials(request),
            )
            known = self.manifests.get(key)
            if known is not None:
                return self._answer(request, target, known)
            return await self._relay_manifest(request, target, key)
        if target is not None and target.kind is Kind.BLOB:
            assert isinstance(target.reference, Digest)
            served = await self._local_blob(request, target)
            if served is not None:
                return served
        return await self.relay(request)

    def _answer(self, request: web.Request, target: Target, known: Answer) -> web.Response:
        request[keys.KIND] = target.kind.value
        request[keys.UPSTREAM] = target.upstream
        request[keys.CACHE_RESULT] = known.source
        request[keys.USER] = known.user
        request[keys.SENT] = 0 if request.method == "HEAD" else len(known.body)
        if isinstance(target.reference, str):
            self.tally.pulled(target.upstream, target.repository, target.reference, known.source)
        return web.Response(body=known.body, headers=CIMultiDict(known.headers))

    async def _relay_manifest(
        self, request: web.Request, target: Target, key: tuple[Any, ...]
    ) -> web.StreamResponse:
        try:
            async with self.primary.send(request) as up:
                reuse = internal.parse_reuse(up.headers.get(internal.REUSE))
                length = parse_count(up.headers.get("Content-Length", ""))
                if (
                    request.method != "GET"
                    or up.status != 200
                    or reuse <= 0
                    or length is None
                    or length > MANIFEST_MAX
                ):
                    return await self.primary.pass_on(request, up)
                body = await up.read()
        except (aiohttp.ClientError, OSError) as exc:
            return self.primary.unreachable(request, exc)
        source = "offline" if up.headers.get(internal.SOURCE) == "offline" else "hit"
        headers = tuple(internal.relayable(up.headers.items()))
        answer = Answer(body, headers, up.headers.get(internal.USER), source)
        # The key's bytes too: it holds every Accept (and Authorization) the client sent.
        size = 200 + len(body) + sum(len(k) + len(v) for k, v in headers) + _size_of(key)
        self.manifests.put(key, answer, reuse, size=size)
        self._accept(request)
        request[keys.INTERNAL] = True  # the primary logged and counted this one
        return web.Response(body=body, headers=CIMultiDict(answer.headers))

    async def _local_blob(self, request: web.Request, target: Target) -> web.StreamResponse | None:
        digest = target.reference
        assert isinstance(digest, Digest)
        key = (target.upstream, target.repository, digest, self._credentials(request))
        name = str(digest)
        known = self.blobs.get(key)
        if known is None:
            if self.settings.auth.enabled and self.accepted.get(key[3]) is None:
                return None  # credentials not seen accepted lately: the primary judges them
            known = await self._probe(request)
            if known is None:
                self.files.drop(name)  # not ours to send (any more): nor to hold open
                return None
            self.blobs.put(key, known, internal.REUSE_MAX)
            # Confirmed anew: open the file anew too. The one held may have been purged and
            # fetched again under the same name since; it must not outlive this second.
            self.files.drop(name)
            self._held[name] = self.clock() + internal.REUSE_MAX
            self._accept(request)
        size, user = known
        try:
            fd, on_disk = await self.files.acquire(name, self.storage.blob_path(digest))
        except OSError:
            self.blobs.forget(key)
            return None
        try:
            if on_disk != size:
                self.files.drop(name)
                self.blobs.forget(key)
                return None
            body = Body(request, digest, size)
            request[keys.KIND] = target.kind.value
            request[keys.UPSTREAM] = target.upstream
            request[keys.CACHE_RESULT] = "hit"
            request[keys.USER] = user
            try:
                return await send_body(request, body, fd, None)
            except FileShrunk:  # changed behind our back
                log.warning("cached_blob_shrank", digest=name, size=size)
                self.files.drop(name)
                self.blobs.forget(key)
                return abort(request, body.resp)
        finally:
            self.files.release(name, fd)

    async def _probe(self, request: web.Request) -> tuple[int, str | None] | None:
        """Whether the primary holds this blob whole, for this request's repository and
        credentials: its size and user, or None (then the request is relayed)."""
        try:
            async with self.primary.send(request, method="HEAD", probe=True) as up:
                size = parse_count(up.headers.get(internal.FILE, "")) if up.status == 200 else None
                return None if size is None else (size, up.headers.get(internal.USER))
        except (aiohttp.ClientError, OSError):
            return None

    # --- what goes to the primary -----------------------------------------------------------

    def _accept(self, request: web.Request) -> None:
        if self.settings.auth.enabled:
            self.accepted.put(self._credentials(request), True, internal.REUSE_MAX)

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """The primary's answer to this request, streamed through as it comes."""
        request[keys.INTERNAL] = True  # the primary logs and counts it
        try:
            async with self.primary.send(request) as up:
                if up.status < 400:
                    self._accept(request)
                return await self.primary.pass_on(request, up)
        except (aiohttp.ClientError, OSError) as exc:
            return self.primary.unreachable(request, exc)

    def log_line(self, request: web.Request, resp: web.StreamResponse, started: float) -> None:
        if request.get(keys.INTERNAL):
            return  # relayed: the primary logged and counted it
        done = answered(request, resp, started, self.index)
        self.tally.answered(done.kind, done.cache, done.status, done.upstream, done.sent)
        self.access.write(done.fields)


FRONT: Final = web.AppKey("front", Front)


def _size_of(key: tuple[Any, ...]) -> int:
    return sum(_size_of(k) if isinstance(k, tuple) else len(str(k)) for k in key)


@web.middleware
async def _errors_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resp = await answer(request, handler)
    request.app[FRONT].log_line(request, resp, started)
    return resp


def create_app(
    settings: Settings,
    socket_path: str,
    access: AccessLog,
    index: int = 1,
    secret: str = "",
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    front = Front(settings, socket_path, access, index, secret, clock)
    app = web.Application(middlewares=[_errors_and_log], client_max_size=64 * 1024)
    app[keys.SETTINGS] = settings
    app[FRONT] = front

    async def resources(app: web.Application) -> Any:
        await front.open()
        task = asyncio.get_running_loop().create_task(front.reporting(), name="worker reports")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await front.close()

    app.cleanup_ctx.append(resources)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await front.handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app
