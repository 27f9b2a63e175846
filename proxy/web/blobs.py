"""``GET``/``HEAD /v2/<name>/blobs/<digest>``: from the cache, from a download under way, or,
for a lazy puller's range deep into a cold blob, from a ranged upstream request of its own.

Bodies of cached files go out with zero-copy ``sendfile``; one range is a 206, several a 206
``multipart/byteranges`` whose parts are sent the same way between their small part headers.

A whole body is safe to stream while it downloads: its final byte is held back until the
digest matches, so a bad download ends in an aborted connection. A range that stops short of
the final byte has no such guard, yet lazy pullers (stargz, SOCI) and containerd's chunked
pulls need ranges of blobs still filling. So a range is served as its bytes arrive, but without
the headers that promise verified content (no ETag, no ``immutable``), and the fill names the
clients it served that way if it later fails; ``verified_ranges_only`` makes ranges wait for
the verified whole instead. A range far beyond what the download has reached
(``lazy_range_gap``) is fetched for that client alone, while the download goes on; only the
download's verified whole ever enters the cache.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from proxy.core.errors import Code, OciError
from proxy.core.peering import MISS_HEADER
from proxy.core.ranges import ByteRange, parse_ranges
from proxy.core.reference import Digest
from proxy.flows.fill import Fill, FillFailed
from proxy.flows.window import Cut
from proxy.upstream.client import UpstreamClient
from proxy.web import keys
from proxy.web.zerocopy import FileShrunk, send_file
from proxy.workers import internal

log = structlog.get_logger("ocicache.handlers")

API_VERSION: Final = {"Docker-Distribution-API-Version": "registry/2.0"}
BLOB_TYPE: Final = "application/octet-stream"
# A lazy read is relayed in pieces of at most this (bounded memory whatever the range).
RELAY_CHUNK: Final = 1024 * 1024


def blob_headers(digest: Digest, *, verified: bool) -> CIMultiDict[str]:
    headers = CIMultiDict(
        {
            **API_VERSION,
            "Content-Type": BLOB_TYPE,
            "Docker-Content-Digest": str(digest),
            "Accept-Ranges": "bytes",
        }
    )
    if verified:
        # Content-addressed: the digest is the strongest validator there is.
        headers["ETag"] = f'"{digest}"'
        headers["Cache-Control"] = "max-age=31536000, immutable"
    else:
        # Bytes of a download whose digest is not checked yet: promise nothing, keep nothing.
        headers["Cache-Control"] = "no-store"
    return headers


class Body:
    """What to send of a blob of ``size``: the whole, one range, or several (multipart)."""

    def __init__(self, request: web.Request, digest: Digest, size: int, *, verified: bool = True) -> None:
        self.size = size
        self.ranges = parse_ranges(request.headers.get("Range"), size)
        headers = blob_headers(digest, verified=verified)
        self.boundary = ""
        self.part_heads: list[bytes] = []
        if self.ranges is None:
            self.resp = web.StreamResponse(status=200, headers=headers)
            self.resp.content_length = size
        elif len(self.ranges) == 1:
            self.resp = web.StreamResponse(status=206, headers=headers)
            self.resp.headers["Content-Range"] = self.ranges[0].content_range(size)
            self.resp.content_length = self.ranges[0].length
        else:
            self.boundary = secrets.token_hex(16)
            headers["Content-Type"] = f"multipart/byteranges; boundary={self.boundary}"
            self.resp = web.StreamResponse(status=206, headers=headers)
            self.part_heads = [
                (
                    f"\r\n--{self.boundary}\r\nContent-Type: {BLOB_TYPE}\r\n"
                    f"Content-Range: {r.content_range(size)}\r\n\r\n"
                ).encode()
                for r in self.ranges
            ]
            self.tail = f"\r\n--{self.boundary}--\r\n".encode()
            self.resp.content_length = (
                sum(len(h) for h in self.part_heads) + len(self.tail) + sum(r.length for r in self.ranges)
            )

    @property
    def multipart(self) -> bool:
        return bool(self.boundary)

    @property
    def first(self) -> int:
        return 0 if self.ranges is None else self.ranges[0].first

    @property
    def spans(self) -> list[ByteRange]:
        return [ByteRange(0, self.size - 1)] if self.ranges is None else self.ranges


def ranged(request: web.Request) -> bool:
    return request.headers.get("Range") is not None


async def blob(
    request: web.Request, client: UpstreamClient, repository: str, digest: Digest
) -> web.StreamResponse:
    if request.get(keys.VIA_WORKER) and internal.PROBE in request.headers:
        return await _probe(request, client, repository, digest)
    cache = request.app[keys.CACHE]
    fills = request.app[keys.FILLS]
    # A blob we hold (or are fetching) through another repository is not this one's to see
    # until upstream says this repository has it too. Joining a fill that is fetching it for
    # this very repository needs no such check: that fetch is upstream's answer.
    running = fills.get(digest)
    same_fetch = running is not None and running.upstream is client and running.repository == repository
    if (digest in cache or running is not None) and not same_fetch:
        await request.app[keys.ACCESS].check(client, repository, digest)
    peer = request.get(keys.PEER)
    if digest in cache:
        try:
            fd, size = await cache.open(digest)
        except FileNotFoundError:
            pass  # removed behind our back (by hand, or disk trouble): fetch it again
        else:
            try:
                return await _serve_cached(request, digest, fd, size)
            finally:
                cache.release(digest, fd)
    if peer is not None:
        return await _serve_peer(request, digest)
    if client.offline and running is None:
        detail = {"digest": str(digest), "offline": True}
        raise OciError(Code.BLOB_UNKNOWN, "not cached, and the proxy is offline", detail)
    if request.method == "HEAD" and running is None:
        # Asking whether a blob exists is not asking for it: upstream answers, nothing downloads.
        upstream_size = await client.blob_size(repository, digest)
        if upstream_size is not None:
            request[keys.CACHE_RESULT] = "pass"
            return Body(request, digest, upstream_size).resp
    fill, started = fills.join(digest, client, repository)
    request[keys.CACHE_RESULT] = "miss" if started else "join"
    try:
        return await _serve_fill(request, fill)
    finally:
        if fill.window is not None:
            # The disk was full: streamed through from memory, and not cached.
            request[keys.CACHE_RESULT] = "uncached"
        fills.leave(fill)


async def _probe(
    request: web.Request, client: UpstreamClient, repository: str, digest: Digest
) -> web.Response:
    """A front worker asks whether it may send this blob from the cache's file itself: yes
    (its size) when the file is whole and this repository may read it; else a 404 and the
    worker relays the request. Opening the file counts it as used (the LRU)."""
    request[keys.INTERNAL] = True
    cache = request.app[keys.CACHE]
    if request.method != "HEAD" or digest not in cache:
        raise OciError(Code.BLOB_UNKNOWN, "not cached")
    await request.app[keys.ACCESS].check(client, repository, digest)
    try:
        fd, size = await cache.open(digest)
    except FileNotFoundError:
        raise OciError(Code.BLOB_UNKNOWN, "not cached") from None
    cache.release(digest, fd)
    return web.Response(status=200, headers={internal.FILE: str(size)})


async def _serve_peer(request: web.Request, digest: Digest) -> web.StreamResponse:
    """A peer asks for a blob we do not hold: it may tail our fill only if that fill fetches from
    upstream (we hold its lease). We never fetch for a peer, nor pass on what we get from
    another peer: a peer asks the lease holder, and followers asking each other could go round
    in a circle."""
    fills = request.app[keys.FILLS]
    cluster = request.app[keys.CLUSTER]
    running = fills.get(digest)
    upstream = running is not None and await running.sourced_from_upstream(2 * cluster.lease_ttl)
    if running is not None and fills.get(digest) is not running:
        # It ended while it chose: committed (then it is in the cache) or failed.
        cache = request.app[keys.CACHE]
        if digest in cache:
            with contextlib.suppress(FileNotFoundError):
                fd, size = await cache.open(digest)
                try:
                    return await _serve_cached(request, digest, fd, size)
                finally:
                    cache.release(digest, fd)
        upstream = False
    if running is None or not upstream:
        request[keys.CACHE_RESULT] = "peer-miss"
        raise OciError(
            Code.BLOB_UNKNOWN, "this replica neither holds nor fetches it", headers={MISS_HEADER: "1"}
        )
    fill, _ = fills.join(digest, running.upstream, running.repository)
    request[keys.CACHE_RESULT] = "join"
    try:
        return await _serve_fill(request, fill)
    finally:
        fills.leave(fill)


async def _serve_cached(request: web.Request, digest: Digest, fd: int, size: int) -> web.StreamResponse:
    body = Body(request, digest, size)
    request[keys.CACHE_RESULT] = "hit"
    cache = request.app[keys.CACHE]
    with cache.pinned(digest):
        try:
            return await send_body(request, body, fd, None)
        except FileShrunk:
            # Truncated behind our back while we served it: this client is cut off, and the
            # next one gets it fetched again instead of the same short file.
            log.warning("cached_blob_shrank", digest=str(digest), size=size)
            await cache.remove(digest)
            return abort(request, body.resp)


async def _serve_fill(request: web.Request, fill: Fill) -> web.StreamResponse:
    """Stream a blob while it downloads (see the module's docstring)."""
    size = await fill.started()
    if size is None:
        # Upstream sent no length. Streaming now would need chunked framing, which zero-copy
        # sending bypasses; wait for the verified whole instead (registries rarely do this).
        size = await fill.finished()
    settings = request.app[keys.SETTINGS]
    if ranged(request) and settings.verified_ranges_only and request.get(keys.PEER) is None:
        await fill.finished()
    body = Body(request, fill.digest, size, verified=not ranged(request) or fill.verified)
    if body.multipart and not fill.verified:
        # Several ranges at once: answered from the verified whole (SOCI reads cached layers).
        await fill.finished()
        body = Body(request, fill.digest, size)
    if ranged(request) and not fill.verified and request.method != "HEAD" and body.ranges is not None:
        fill.note_unverified_reader(_client_of(request))
        rng = body.ranges[0] if len(body.ranges) == 1 else None
        if (
            rng is not None
            and rng.length <= settings.lazy_range_max
            and fill.far_from(rng.first, settings.lazy_range_gap)
            and fill.take_relay(rng.length)
        ):
            relayed = await _relay(request, fill, body)
            if relayed is not None:
                return relayed
            fill.untake_relay(rng.length)
    reader = id(body.resp)
    try:
        fill.attach(reader, body.first)
    except Cut as exc:
        # A download the disk could not take, joined too late: nothing sent yet, so an honest
        # "try again" (the next try finds the download over, and starts its own).
        raise OciError(Code.UNAVAILABLE, str(exc), headers={"Retry-After": "1"}) from None
    try:
        with request.app[keys.CACHE].pinned(fill.digest):
            return await send_body(request, body, fill.read_fd, fill)
    finally:
        fill.detach(reader)


async def _relay(request: web.Request, fill: Fill, body: Body) -> web.StreamResponse | None:
    """A lazy puller's range far ahead of the download: fetch it for this client alone and
    relay it (bounded memory), while the download goes on. None: upstream would not give just
    that range; the caller waits for the download instead."""
    assert body.ranges is not None and len(body.ranges) == 1
    rng = body.ranges[0]
    if fill.from_upstream is False:
        return None  # its bytes come from a peer: only the lease holder asks upstream
    try:
        stream = await fill.upstream.open_blob(fill.repository, fill.digest, rng.first, rng.end)
    except OciError:
        return None
    try:
        if stream.start != rng.first or not stream.ranged:
            return None
        request[keys.CACHE_RESULT] = "lazy"
        resp = body.resp
        await resp.prepare(request)
        sent = 0
        try:
            async for chunk in stream.chunks(RELAY_CHUNK):
                chunk = chunk[: rng.length - sent]
                await resp.write(chunk)
                sent += len(chunk)
                if sent >= rng.length:
                    break
        except (OciError, ConnectionError):
            return abort(request, resp)
        request[keys.SENT] = sent
        if sent < rng.length:
            return abort(request, resp)
        await resp.write_eof()
        return resp
    finally:
        stream.close()


def _client_of(request: web.Request) -> str:
    agent = request.headers.get("User-Agent", "-")[:80]
    return f"{request.remote} ({agent})"


async def send_body(request: web.Request, body: Body, fd: int, fill: Fill | None) -> web.StreamResponse:
    """Send ``body`` from ``fd``; with a ``fill``, tail its file as it grows, and take from its
    window the bytes a full disk kept in memory."""
    resp = body.resp
    try:
        writer = await resp.prepare(request)
    except ConnectionError:
        return abort(request, resp)  # the client left before the headers went out
    assert writer is not None
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    try:
        for i, span in enumerate(body.spans):
            if body.multipart:
                await resp.write(body.part_heads[i])
            await _send_span(request, resp, writer, fd, span.first, span.end, fill)
        if body.multipart:
            await resp.write(body.tail)
    except FileShrunk:
        if fill is None:
            raise  # a cached file: the caller drops it, then aborts
        return abort(request, resp)
    except (FillFailed, Cut, ConnectionError):
        return abort(request, resp)
    except Exception:
        # Headers are gone already: the only honest way left to fail is to cut the connection.
        log.exception("send_failed", path=request.path)
        return abort(request, resp)
    await resp.write_eof()
    return resp


async def _send_span(
    request: web.Request,
    resp: web.StreamResponse,
    writer: AbstractStreamWriter,
    fd: int,
    pos: int,
    end: int,
    fill: Fill | None,
) -> None:
    while pos < end:
        if fill is None:
            limit = end
        else:
            limit = min(await fill.wait_beyond(pos), end)
            window = fill.window
            if window is not None and limit > window.origin:
                if pos >= window.origin:
                    data = window.take(id(resp), pos, limit)
                    await resp.write(data)
                    request[keys.SENT] = request.get(keys.SENT, 0) + len(data)
                    pos = limit
                    continue
                limit = window.origin  # the part still in the file first
        await send_file(request, writer, fd, pos, limit - pos)
        request[keys.SENT] = request.get(keys.SENT, 0) + (limit - pos)
        pos = limit


def abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """End the connection abruptly: a client must never take a short or bad body as whole."""
    request[keys.ABORTED] = True
    resp.force_close()
    if request.transport is not None:
        request.transport.abort()
    return resp
