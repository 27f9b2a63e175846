"""The app's runner: aiohttp's, except that requests it cannot parse get the OCI envelope.

aiohttp answers a request it cannot parse (a header line over 8,190 bytes, a broken request
line, a bad header character) by itself, before any handler or middleware runs, with a plain
text body that quotes what it choked on. Its request handler builds that answer in
``handle_error``; we build the connection handlers from a subclass that answers with the OCI
error envelope instead, keeping aiohttp's status, and logs one line instead of a traceback.
Everything else is aiohttp's.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.core.errors import OciError, code_for_status, error_response

log = structlog.get_logger("ocicache.http")


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


class _Server(web.Server):
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
