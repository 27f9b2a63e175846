"""The app's runner: aiohttp's, with the connection level made fit for a shared network.

* **Unparsable requests** (a header line over 8,190 bytes, a broken request line, a bad header
  character) are answered by aiohttp itself, before any handler or middleware runs, with a
  plain text body that quotes what it choked on. Its request handler builds that answer in
  ``handle_error``; ours answers with the OCI error envelope instead, keeping aiohttp's
  status, and logs one line instead of a traceback.
* **Versions we do not speak** (HTTP/2.0 in text, HTTP/0.9) are refused in HTTP/1.1, and a
  request asking for a protocol **upgrade** is answered and its connection closed (see
  :class:`_Server`).
* **Slow and idle clients.** A request's head must arrive whole within ``header_timeout`` of
  its first byte (else 408 and the connection closed: slowloris); a connection with no
  request under way is closed after ``idle_timeout`` (aiohttp's keep-alive timer, which also
  runs from the moment a connection opens); one address may hold at most
  ``max_connections_per_address`` connections (more are answered 429 and closed at once), and
  a connection is closed after ``max_requests_per_connection`` answers. Bodies the proxy does
  not read (on a GET) are drained for at most aiohttp's lingering time, 10 s, then the
  connection is closed; the one body it reads, a token request's, has ``header_timeout`` too
  (``web/login.py``).
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.core.config import Settings
from proxy.core.connections import ConnectionCounts
from proxy.core.errors import Code, OciError, code_for_status, envelope, error_response
from proxy.core.limiter import address_key
from proxy.web import keys
from proxy.web.metrics import Metrics

log = structlog.get_logger("ocicache.http")

_Handle = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_Factory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], BaseRequest
]


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float
    idle_timeout: float
    per_address: int
    requests_per_connection: int

    @classmethod
    def of(cls, settings: Settings, processes: int = 1) -> Limits:
        """``processes`` serving one port share the per-address limit (see :func:`share`)."""
        return cls(
            settings.header_timeout,
            settings.idle_timeout,
            share(settings.max_connections_per_address, processes),
            settings.max_requests_per_connection,
        )


def share(limit: int, processes: int) -> int:
    """One process's part of a per-address ``limit`` over ``processes`` on one port, which
    count apart. The kernel picks a process for each connection by a hash of its addresses
    and ports, so one address's connections spread like coin tosses, not evenly: each
    process allows its even share plus three standard deviations of that spread (at most the
    limit). An address within its limit is then all but never refused; one past it is held
    to a little more (256 over 2 processes: 162 each).  0 is no limit."""
    if limit == 0 or processes <= 1:
        return limit
    even = limit / processes
    return min(limit, math.ceil(even + 3 * math.sqrt(even)))


def _raw_error(code: Code, message: str, extra: str = "") -> bytes:
    """A whole error answer, for a connection no request object exists for."""
    err = OciError(code, message)
    body = envelope(code, message)
    reason = {408: "Request Timeout", 429: "Too Many Requests"}.get(err.status, "Error")
    head = (
        f"HTTP/1.1 {err.status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class _Handler(RequestHandler):
    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._address: str | None = None  # counted against the limit while open
        self._internal = False  # a front worker's connection on the Unix socket
        self._head_timer: asyncio.TimerHandle | None = None
        self.answered = 0

    # --- connections per address ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            # A front worker's relay (serve --workers): its clients were counted where they
            # connected, and all of its connections come from one "address".
            self._internal = True
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        address = address_key(peer[0] if isinstance(peer, tuple) else None)
        if not self._guard.counts.admit(address):
            self._guard.refused("address_limit", address)
            assert isinstance(transport, asyncio.Transport)
            transport.write(
                _raw_error(
                    Code.TOOMANYREQUESTS, "too many connections from this address", "Retry-After: 1\r\n"
                )
            )
            transport.close()
            return
        self._address = address
        self._guard.opened()
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._internal:
            super().connection_lost(exc)
            return
        if self._address is not None:
            self._guard.counts.release(self._address)
            self._guard.closed()
            self._address = None
            super().connection_lost(exc)

    # --- the header deadline ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            self._disarm()  # a whole head arrived
        elif data and self._head_timer is None and self._waiting():
            # The first bytes of a head, while no request is under way.
            self._head_timer = self._loop.call_later(self._guard.limits.header_timeout, self._head_late)

    def _waiting(self) -> bool:
        return self._waiter is not None and not self._waiter.done()

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport is None or self._messages or not self._waiting():
            return
        peer = self.transport.get_extra_info("peername")
        self._guard.refused("header_timeout", address_key(peer[0] if isinstance(peer, tuple) else None))
        self.transport.write(_raw_error(Code.REQUEST_TIMEOUT, "request head not received in time"))
        self.force_close()

    # --- unparsable requests -----------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # As aiohttp: a response has begun, so only breaking the connection is left.
            raise ConnectionError("response already started, cannot send an error")
        if 400 <= status < 500:
            # A client's garbage is not our error: one line, no traceback to flood the log.
            log.info("request_unparsable", status=status, reason=type(exc).__name__, remote=request.remote)
            text = "malformed request"
        else:
            log.error("request_failed", status=status, exc_info=exc)
            text = "internal error"
        resp = error_response(OciError(code_for_status(status), text))
        resp.force_close()
        return resp


# The request's own version, when it is one we do not speak (the request is then made 1.1).
_UNSPOKEN: Final = web.RequestKey("unspoken_version", str)
_SPOKEN: Final = frozenset({HttpVersion10, HttpVersion11})


class _Server(web.Server):
    """aiohttp's server, but for the handlers it makes, the versions it answers, and the
    connections it keeps.

    aiohttp answers a request in the request's own version: ``HTTP/2.0 404 Not Found`` in
    text to a request line that says HTTP/2.0, ``HTTP/0.9 200 OK`` with headers to one that
    has no version. No client can read either. Such a request becomes a 1.1 request that gets
    a 400 envelope and a closed connection, before the app sees it. A request with ``Upgrade``,
    and the last a connection may make, are answered with ``Connection: close`` (see ``make``).
    """

    def __init__(
        self,
        handler: _Handle,
        *,
        request_factory: _Factory,
        limits: Limits,
        metrics: Metrics | None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits
        self.counts = ConnectionCounts(limits.per_address)
        self._metrics = metrics
        # Kept whether or not there are metrics: a front worker reports them to the primary.
        self.open_connections = 0
        self.refusals: dict[str, int] = {}

        async def handle(request: BaseRequest) -> web.StreamResponse:
            unspoken = request.get(_UNSPOKEN)
            if unspoken is None:
                return await handler(request)
            log.info("request_unparsable", status=400, reason="http_version", remote=request.remote)
            resp = error_response(
                OciError(Code.REQUEST_INVALID, "HTTP/1.0 and HTTP/1.1 only", {"version": unspoken[:20]})
            )
            resp.force_close()
            return resp

        def make(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> BaseRequest:
            if isinstance(protocol, _Handler):
                protocol.answered += 1
                if protocol.answered >= limits.requests_per_connection:
                    message = message._replace(should_close=True)
            if message.upgrade and not message.should_close:
                # We switch to no other protocol, and aiohttp's parser drops whatever was
                # pipelined behind such a request (all but websocket), leaving the connection
                # open and silent: answer this one and close, so the client retries the rest.
                message = message._replace(should_close=True)
            if message.version in _SPOKEN:
                return request_factory(message, payload, protocol, writer, task)
            version = message.version
            message = message._replace(version=HttpVersion11, should_close=True)
            request = request_factory(message, payload, protocol, writer, task)
            request[_UNSPOKEN] = f"HTTP/{version.major}.{version.minor}"
            return request

        kwargs.setdefault("keepalive_timeout", limits.idle_timeout)
        super().__init__(handle, request_factory=make, **kwargs)

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def opened(self) -> None:
        self.open_connections += 1
        if self._metrics is not None:
            self._metrics.open_connections += 1

    def closed(self) -> None:
        self.open_connections -= 1
        if self._metrics is not None:
            self._metrics.open_connections -= 1

    def refused(self, reason: str, address: str) -> None:
        log.info("connection_refused", reason=reason, remote=address)
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if self._metrics is not None:
            self._metrics.connections_refused.labels(reason).inc()


class AppRunner(web.AppRunner):
    def __init__(self, app: web.Application, *, processes: int = 1, **kwargs: Any) -> None:
        """``processes``: how many serve the port (``serve --workers``), this one among them."""
        super().__init__(app, **kwargs)
        self._processes = max(1, processes)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        settings = self.app.get(keys.SETTINGS) or Settings()
        server = _Server(
            made.request_handler,
            request_factory=made.request_factory,
            limits=Limits.of(settings, self._processes),
            metrics=self.app.get(keys.METRICS),
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        return server


def take_connection_stats(runner: web.BaseRunner) -> tuple[int, dict[str, int]]:
    """Connections the runner's server holds now, and those it refused since the last call
    (by reason): what a front worker reports to the primary."""
    server = runner.server
    if not isinstance(server, _Server):
        return 0, {}
    refused, server.refusals = server.refusals, {}
    return server.open_connections, refused
