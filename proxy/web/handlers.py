"""Thin handlers: parse the request into values, call the domain, write the response.

Each handler records what it did in ``request[CACHE_RESULT]`` / ``request[SENT]`` for the one
log line the middleware in :mod:`app` writes per request.
"""

from __future__ import annotations

import json
from typing import Final

import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.core.links import next_link
from proxy.core.reference import Digest, Kind, parse_path, parse_range
from proxy.core.routing import route
from proxy.flows.fills import Fill, FillFailed
from proxy.flows.window import Cut
from proxy.upstream.client import UpstreamClient
from proxy.web import keys
from proxy.web.zerocopy import FileShrunk, send_file

log = structlog.get_logger("ocicache.handlers")

API_VERSION: Final = {"Docker-Distribution-API-Version": "registry/2.0"}
BLOB_TYPE: Final = "application/octet-stream"


async def base(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise OciError(Code.UNSUPPORTED, "this proxy serves pulls only")
    return web.json_response({}, headers=API_VERSION)


async def registry_api(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise OciError(Code.UNSUPPORTED, "this proxy serves pulls only", {"method": request.method})
    parsed = parse_path(request.rel_url.raw_path)
    settings = request.app[keys.SETTINGS]
    upstreams = request.app[keys.UPSTREAMS]
    where = route(parsed.name, request.query.get("ns"), upstreams.keys(), settings.default_upstream.name)
    client = upstreams[where.upstream]
    request[keys.KIND] = parsed.kind.value
    request[keys.UPSTREAM] = client.name
    if parsed.kind is Kind.MANIFEST:
        assert parsed.reference is not None
        return await manifest(request, client, where.repository, parsed.reference)
    if parsed.kind is Kind.BLOB:
        assert isinstance(parsed.reference, Digest)
        return await blob(request, client, where.repository, parsed.reference)
    return await tags(request, client, where.repository)


async def manifest(
    request: web.Request, client: UpstreamClient, repository: str, reference: Digest | str
) -> web.Response:
    store = request.app[keys.MANIFESTS]
    served = await store.get(client, repository, reference, request.headers.getall("Accept", []))
    request[keys.CACHE_RESULT] = served.source
    if isinstance(reference, str):
        # A pull asks for its tag once: the status page's pulls by image.
        request.app[keys.PULLS].count(client.name, repository, reference, served.source)
    request[keys.SENT] = 0 if request.method == "HEAD" else served.size
    return web.Response(
        body=served.body,
        headers={
            **API_VERSION,
            "Content-Type": served.media_type,
            "Docker-Content-Digest": str(served.digest),
            "ETag": f'"{served.digest}"',
        },
    )


async def tags(request: web.Request, client: UpstreamClient, repository: str) -> web.Response:
    settings = request.app[keys.SETTINGS]
    query: dict[str, str] = {}
    n = parse_count(request.query.get("n", str(settings.tags_page_max)))
    if n is None:
        raise OciError(Code.PAGINATION_INVALID, "n must be a number")
    query["n"] = str(min(n, settings.tags_page_max))
    if "last" in request.query:
        query["last"] = request.query["last"]
    headers = {**API_VERSION, "Content-Type": "application/json"}
    if client.offline:
        # Offline, the tags this cache knows are the answer (a page of them, like upstream's).
        known = request.app[keys.CATALOGUE].tag_names(client.name, repository)
        if not known:
            raise OciError(Code.NAME_UNKNOWN, "no tags cached, and the proxy is offline", {"offline": True})
        page, more = tags_page(known, int(query["n"]), query.get("last"))
        if more:
            ours = next_link(
                f'<?n={query["n"]}&last={page[-1]}>; rel="next"', request.rel_url.path, _routing(request)
            )
            if ours is not None:
                headers["Link"] = ours
        request[keys.CACHE_RESULT] = "offline"
        body = json.dumps({"name": repository, "tags": page}).encode()
        return web.Response(body=body, headers=headers)
    body, link = await client.tags(repository, query)
    ours = None if link is None else next_link(link, request.rel_url.path, _routing(request))
    if ours is not None:
        headers["Link"] = ours
    request[keys.CACHE_RESULT] = "pass"
    return web.Response(body=body, headers=headers)


def tags_page(names: list[str], n: int, last: str | None) -> tuple[list[str], bool]:
    """A page of sorted tag ``names`` after ``last``, at most ``n``; and whether more follow."""
    ordered = sorted(names)
    if last is not None:
        ordered = [t for t in ordered if t > last]
    return ordered[:n], len(ordered) > n


def _routing(request: web.Request) -> dict[str, str]:
    """The query parameters that chose the upstream, for links back to us."""
    ns = request.query.get("ns")
    return {} if ns is None else {"ns": ns}


# --- blobs -----------------------------------------------------------------------------------


def _blob_headers(digest: Digest, *, verified: bool) -> CIMultiDict[str]:
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


def _start(
    request: web.Request, digest: Digest, size: int, *, verified: bool = True
) -> tuple[web.StreamResponse, int, int]:
    """The response head for a blob of ``size``, and the byte span [first, end) to send.
    ``verified`` False: a range of a download still under way (see :func:`_serve_fill`)."""
    rng = parse_range(request.headers.get("Range"), size)
    resp = web.StreamResponse(status=206 if rng else 200, headers=_blob_headers(digest, verified=verified))
    if rng is None:
        resp.content_length = size
        return resp, 0, size
    resp.headers["Content-Range"] = rng.content_range(size)
    resp.content_length = rng.length
    return resp, rng.first, rng.last + 1


def _ranged(request: web.Request) -> bool:
    return request.headers.get("Range") is not None


async def blob(
    request: web.Request, client: UpstreamClient, repository: str, digest: Digest
) -> web.StreamResponse:
    cache = request.app[keys.CACHE]
    fills = request.app[keys.FILLS]
    # A blob we hold (or are fetching) through another repository is not this one's to see
    # until upstream says this repository has it too. Joining a fill that is fetching it for
    # this very repository needs no such check: that fetch is upstream's answer.
    running = fills.get(digest)
    same_fetch = running is not None and running.upstream is client and running.repository == repository
    if (digest in cache or running is not None) and not same_fetch:
        await request.app[keys.ACCESS].check(client, repository, digest)
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
    if client.offline and running is None:
        raise OciError(
            Code.BLOB_UNKNOWN,
            "not cached, and the proxy is offline",
            {"digest": str(digest), "offline": True},
        )
    if request.method == "HEAD" and running is None:
        # Asking whether a blob exists is not asking for it: upstream answers, nothing downloads.
        upstream_size = await client.blob_size(repository, digest)
        if upstream_size is not None:
            request[keys.CACHE_RESULT] = "pass"
            resp, _, _ = _start(request, digest, upstream_size)
            return resp
    fill, started = fills.join(digest, client, repository)
    request[keys.CACHE_RESULT] = "miss" if started else "join"
    try:
        return await _serve_fill(request, fill)
    finally:
        if fill.window is not None:
            # The disk was full: streamed through from memory, and not cached.
            request[keys.CACHE_RESULT] = "uncached"
        fills.leave(fill)


async def _serve_cached(request: web.Request, digest: Digest, fd: int, size: int) -> web.StreamResponse:
    resp, first, end = _start(request, digest, size)
    request[keys.CACHE_RESULT] = "hit"
    cache = request.app[keys.CACHE]
    with cache.pinned(digest):
        try:
            return await _send_body(request, resp, fd, first, end, None)
        except FileShrunk:
            # Truncated behind our back while we served it: this client is cut off, and the
            # next one gets it fetched again instead of the same short file.
            log.warning("cached_blob_shrank", digest=str(digest), size=size)
            await cache.remove(digest)
            return _abort(request, resp)


async def _serve_fill(request: web.Request, fill: Fill) -> web.StreamResponse:
    """Stream a blob while it downloads.

    A whole body is safe to stream before verification: its final byte is held back until the
    digest matches, so a bad download ends in an aborted connection. A range that stops short
    of the final byte has no such guard, yet lazy pullers (stargz, SOCI) and containerd's
    chunked pulls need ranges of blobs still filling. So a range is served as its bytes arrive,
    but without the headers that promise verified content (no ETag, no ``immutable``), and the
    fill names the clients it served that way if it later fails. ``verified_ranges_only``
    makes ranges wait for the verified whole instead.
    """
    size = await fill.started()
    if size is None:
        # Upstream sent no length. Streaming now would need chunked framing, which zero-copy
        # sending bypasses; wait for the verified whole instead (registries rarely do this).
        size = await fill.finished()
    if _ranged(request) and request.app[keys.SETTINGS].verified_ranges_only:
        await fill.finished()
    unverified = _ranged(request) and not fill.verified
    resp, first, end = _start(request, fill.digest, size, verified=not unverified)
    if unverified and request.method != "HEAD" and resp.status == 206:
        fill.note_unverified_reader(_client_of(request))
    reader = id(resp)
    try:
        fill.attach(reader, first)
    except Cut as exc:
        # A download the disk could not take, joined too late: nothing sent yet, so an honest
        # "try again" (the next try finds the download over, and starts its own).
        raise OciError(Code.UNAVAILABLE, str(exc), headers={"Retry-After": "1"}) from None
    try:
        with request.app[keys.CACHE].pinned(fill.digest):
            return await _send_body(request, resp, fill.read_fd, first, end, fill)
    finally:
        fill.detach(reader)


def _client_of(request: web.Request) -> str:
    agent = request.headers.get("User-Agent", "-")[:80]
    return f"{request.remote} ({agent})"


async def _send_body(
    request: web.Request,
    resp: web.StreamResponse,
    fd: int,
    first: int,
    end: int,
    fill: Fill | None,
) -> web.StreamResponse:
    """Send bytes [first, end) of ``fd``; with a ``fill``, tail its file as it grows, and take
    from its window the bytes a full disk kept in memory."""
    writer = await resp.prepare(request)
    assert writer is not None
    if request.method == "HEAD":
        await resp.write_eof()
        return resp
    pos = first
    try:
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
    except FileShrunk:
        if fill is None:
            raise  # a cached file: the caller drops it, then aborts
        return _abort(request, resp)
    except (FillFailed, Cut, ConnectionResetError):
        return _abort(request, resp)
    except Exception:
        # Headers are gone already: the only honest way left to fail is to cut the connection.
        log.exception("send_failed", path=request.path)
        return _abort(request, resp)
    await resp.write_eof()
    return resp


def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """End the connection abruptly: a client must never take a short or bad body as whole."""
    request[keys.ABORTED] = True
    resp.force_close()
    if request.transport is not None:
        request.transport.abort()
    return resp


async def not_found(request: web.Request) -> web.Response:
    raise OciError(Code.NAME_UNKNOWN, "no such endpoint")
