"""A front worker's line to the primary: a client's request passed on over the primary's Unix
socket, with the client's address, scheme and port in internal headers, and the answer
streamed back as it comes, cut short if the primary cuts it short."""

from __future__ import annotations

from typing import Final

import aiohttp
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError, error_response
from proxy.web import keys
from proxy.web.blobs import abort
from proxy.web.workerlink import REPORT_PATH
from proxy.workers import internal

log = structlog.get_logger("ocicache.worker")

# Connecting over a local socket is quick or broken. Reading has no deadline of its own: the
# primary bounds every upstream call, and a client tailing a slow download waits for it as
# long as the primary lets it.
CONNECT_TIMEOUT: Final = 5.0
RELAY_CHUNK: Final = 256 * 1024
# Probes and reports: a pool of their own, so that clients holding every relayed answer open
# (slow readers of cold blobs) never hold up what the worker itself asks; with a deadline.
CONTROL_CONNECTIONS: Final = 16
CONTROL_TIMEOUT: Final = 10.0
_UNREACHABLE: Final = "the proxy's primary process cannot be reached"


def _url(path: str, query: str = "") -> URL:
    return URL.build(scheme="http", host="ocicache", path=path, query_string=query, encoded=True)


class Relay:
    def __init__(self, socket_path: str, index: int, idle_timeout: float) -> None:
        self.socket_path = socket_path
        self.index = index
        # Shorter than the primary's idle timeout, so that the pool never sends a request on a
        # connection the primary is closing as idle.
        self._keepalive = min(15.0, idle_timeout / 2)
        self._session: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientSession | None = None

    def _pool(self, limit: int, total: float | None) -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(
            path=self.socket_path, limit=limit, keepalive_timeout=self._keepalive
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )

    async def open(self) -> None:
        # Relayed requests: one connection each, as many as clients ask at once (the same
        # load the primary would carry with one process; the socket's backlog is sized for
        # a burst of them).
        self._session = self._pool(0, None)
        self._control = self._pool(CONTROL_CONNECTIONS, CONTROL_TIMEOUT)

    async def close(self) -> None:
        for session in (self._session, self._control):
            if session is not None:
                await session.close()

    @property
    def open_(self) -> bool:
        return self._control is not None and not self._control.closed

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "open() first"
        return self._session

    @property
    def control(self) -> aiohttp.ClientSession:
        assert self._control is not None, "open() first"
        return self._control

    def send(
        self, request: web.Request, *, method: str | None = None, probe: bool = False
    ) -> aiohttp.client._RequestContextManager:
        """``request`` to the primary (as ``method``; a ``probe``: a HEAD asking whether a blob
        is cached, which fetches nothing)."""
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
        return (self.control if probe else self.session).request(
            method or request.method,
            url,
            headers=headers,
            data=request.content.iter_chunked(RELAY_CHUNK) if reads else None,
            allow_redirects=False,
        )

    async def pass_on(self, request: web.Request, up: aiohttp.ClientResponse) -> web.StreamResponse:
        """The primary's answer ``up``, streamed to the client as it comes."""
        request[keys.INTERNAL] = True  # the primary logged and counted it
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

    def unreachable(self, request: web.Request, exc: BaseException) -> web.Response:
        """What the client gets when the primary cannot be asked (logged by the worker)."""
        request[keys.INTERNAL] = False
        log.warning("primary_unreachable", error=str(exc) or type(exc).__name__)
        return error_response(OciError(Code.UNAVAILABLE, _UNREACHABLE, headers={"Retry-After": "1"}))

    async def report(self, body: bytes, secret: str) -> None:
        """A tally (:mod:`proxy.workers.tally`) to the primary; lost, not retried, if it fails."""
        try:
            headers = {internal.WORKER: str(self.index), internal.SECRET: secret}
            async with self.control.post(_url(REPORT_PATH), data=body, headers=headers) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("worker_report_lost", error=str(exc))  # counts lost, never answers
