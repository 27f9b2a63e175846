"""The app's runner: aiohttp's, except that requests it cannot parse get the OCI envelope.

aiohttp answers a request it cannot parse (a header line over 8,190 bytes, a broken request
line, a bad header character) by itself, before any handler or middleware runs, with a plain
text body that quotes what it choked on. Its request handler builds that answer in
``handle_error``; we build the connection handlers from a subclass that answers with the OCI
error envelope instead, keeping aiohttp's status, and logs one line instead of a traceback.
Requests in a version we do not speak (HTTP/2.0 in text, HTTP/0.9) are refused in HTTP/1.1,
and a request asking for a protocol upgrade is answered and its connection closed (see
:class:`_Server`). Everything else is aiohttp's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.core.errors import Code, OciError, code_for_status, error_response

log = structlog.get_logger("ocicache.http")

_Handle = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
_Factory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], BaseRequest
]


class _Handler(RequestHandler):
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
    """aiohttp's server, but for the handlers it makes and the versions it answers.

    aiohttp answers a request in the request's own version: ``HTTP/2.0 404 Not Found`` in
    text to a request line that says HTTP/2.0, ``HTTP/0.9 200 OK`` with headers to one that
    has no version. No client can read either. Such a request becomes a 1.1 request that gets
    a 400 envelope and a closed connection, before the app sees it. And a request with
    ``Upgrade`` is answered with ``Connection: close`` (see ``make``).
    """

    def __init__(self, handler: _Handle, *, request_factory: _Factory, **kwargs: Any) -> None:
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

        super().__init__(handle, request_factory=make, **kwargs)

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        server = _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        return server
