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
from aiohttp import hdrs, web
from cachetools import LRUCache
from multidict import CIMultiDict
from yarl import URL

from proxy.core.config import Settings
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError, error_response
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
from proxy.web.workerlink import REPORT_PATH
from proxy.web.zerocopy import FileShrunk
from proxy.workers import internal
from proxy.workers.memo import Memo
from proxy.workers.tally import Tally

log = structlog.get_logger("ocicache.worker")


# How often the worker reports its counts and lets go of files it no longer may send.
REPORT_EVERY: Final = 1.0
# The relay's connection to the primary: local, so connecting is quick or broken. Reading has
# no deadline of its own: the primary bounds every upstream call, and a client tailing a slow
# download waits for it as long as the primary lets it.
CONNECT_TIMEOUT: Final = 5.0
RELAY_CHUNK: Final = 256 * 1024
# Relay connections open at once; more requests wait for one (each worker's clients are
# bounded by max_connections_per_address already: this bounds the primary's side too).
RELAYS_MAX: Final = 1024
# What the worker answers a request with while the primary cannot be reached.
_UNREACHABLE: Final = "the proxy's primary process cannot be reached"


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
        self.socket_path = socket_path
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
        self._session: aiohttp.ClientSession | None = None
        # The runner serving this app, once set up: its connections go in the reports.
        self.runner: web.BaseRunner | None = None
        # Shorter than the primary's idle timeout, so that the pool never sends a request on a
        # connection the primary is closing as idle.
        self._keepalive = min(15.0, settings.idle_timeout / 2)

    # --- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        connector = aiohttp.UnixConnector(
            path=self.socket_path, limit=RELAYS_MAX, keepalive_timeout=self._keepalive
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Connecting is bounded; waiting for a free relay connection is not (a client that
            # waits is bounded by its own patience and our idle and header timeouts).
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        await self.report()
        if self._session is not None:
            await self._session.close()
        self.files.close()
        self.access.flush()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "open() first"
        return self._session

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
        if self._session is None or self._session.closed:
            return
        # Sent even when nothing was answered: the connections held are news too.
        connections, refused = (0, {}) if self.runner is None else take_connection_stats(self.runner)
        body = self.tally.take(connections, refused)
        try:
            headers = {internal.WORKER: str(self.index), internal.SECRET: self.secret}
            async with self.session.post(_url(REPORT_PATH), data=body, headers=headers) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("worker_report_lost", error=str(exc))  # counts lost, never answers

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
            async with self._send(request) as up:
                reuse = internal.parse_reuse(up.headers.get(internal.REUSE))
                length = parse_count(up.headers.get("Content-Length", ""))
                if (
                    request.method != "GET"
                    or up.status != 200
                    or reuse <= 0
                    or length is None
                    or length > MANIFEST_MAX
                ):
                    return await self._pass(request, up)
                body = await up.read()
        except (aiohttp.ClientError, OSError) as exc:
            return self._unreachable(request, exc)
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
            async with self._send(request, method="HEAD", probe=True) as up:
                size = parse_count(up.headers.get(internal.FILE, "")) if up.status == 200 else None
                return None if size is None else (size, up.headers.get(internal.USER))
        except (aiohttp.ClientError, OSError):
            return None

    # --- the relay --------------------------------------------------------------------------

    def _send(
        self, request: web.Request, *, method: str | None = None, probe: bool = False
    ) -> aiohttp.client._RequestContextManager:
        headers = internal.relayable(request.headers.items())
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        headers += [
            (internal.CLIENT, request.remote or ""),
            (internal.SCHEME, request.scheme),
            (internal.WORKER, str(self.index)),
            (internal.PORT, str(sockname[1]) if isinstance(sockname, tuple) else ""),
        ]
        if hdrs.HOST not in request.headers:
            headers.append((internal.NO_HOST, "1"))
        if probe:
            headers.append((internal.PROBE, "1"))
        url = _url(request.rel_url.raw_path, request.rel_url.raw_query_string)
        reads = request.can_read_body and not probe
        return self.session.request(
            method or request.method,
            url,
            headers=headers,
            data=request.content.iter_chunked(RELAY_CHUNK) if reads else None,
            allow_redirects=False,
        )

    def _accept(self, request: web.Request) -> None:
        if self.settings.auth.enabled:
            self.accepted.put(self._credentials(request), True, internal.REUSE_MAX)

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """The primary's answer to this request, streamed through as it comes."""
        request[keys.INTERNAL] = True  # the primary logs and counts it
        try:
            async with self._send(request) as up:
                if up.status < 400:
                    self._accept(request)
                return await self._pass(request, up)
        except (aiohttp.ClientError, OSError) as exc:
            return self._unreachable(request, exc)

    async def _pass(self, request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
        request[keys.INTERNAL] = True
        resp = web.StreamResponse(
            status=up.status, reason=up.reason, headers=CIMultiDict(internal.relayable(up.headers.items()))
        )
        length = parse_count(up.headers.get("Content-Length", ""))
        if length is not None:
            resp.content_length = length
        elif up.headers.get("Transfer-Encoding", "").lower() == "chunked":
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
        except ConnectionError:
            return abort(request, resp)
        if request.method == "HEAD" or up.status in (204, 304):
            await resp.write_eof()
            return resp
        try:
            async for chunk in up.content.iter_chunked(RELAY_CHUNK):
                await resp.write(chunk)
        except (TimeoutError, aiohttp.ClientError, OSError):
            # The primary cut its answer short (a bad download, a kill): so do we, never a
            # clean end of a short body.
            return abort(request, resp)
        await resp.write_eof()
        return resp

    def _unreachable(self, request: web.Request, exc: BaseException) -> web.Response:
        request[keys.INTERNAL] = False
        log.warning("primary_unreachable", error=str(exc) or type(exc).__name__)
        return error_response(OciError(Code.UNAVAILABLE, _UNREACHABLE, headers={"Retry-After": "1"}))

    def log_line(self, request: web.Request, resp: web.StreamResponse, started: float) -> None:
        if request.get(keys.INTERNAL):
            return  # relayed: the primary logged and counted it
        done = answered(request, resp, started, self.index)
        self.tally.answered(done.kind, done.cache, done.status, done.upstream, done.sent)
        self.access.write(done.fields)


FRONT: Final = web.AppKey("front", Front)


def _size_of(key: tuple[Any, ...]) -> int:
    return sum(_size_of(k) if isinstance(k, tuple) else len(str(k)) for k in key)


def _url(path: str, query: str = "") -> URL:
    return URL.build(scheme="http", host="ocicache", path=path, query_string=query, encoded=True)


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
