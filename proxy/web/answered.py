"""What became of a request, for the one middleware of the primary's app and of a front
worker's: its answer whatever the handler raised (the OCI envelope for every error), and the
fields of its access line.

A path or ``ns=`` longer than :data:`LOGGED_MAX` characters is cut there in the line (with
``…``): a line then stays within what one write to a pipe keeps whole (``PIPE_BUF``), which
the processes of ``serve --workers`` sharing stderr rely on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web

from proxy.core.errors import Code, OciError, code_for_status, error_response
from proxy.web import keys

log = structlog.get_logger("ocicache.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOGGED_MAX: Final = 1024


async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``handler``'s answer; an error it raises becomes the OCI envelope (a crash a 500)."""
    try:
        return await handler(request)
    except OciError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(OciError(code_for_status(exc.status), exc.reason))
    except Exception:
        log.exception("handler_crashed", method=request.method, path=request.path)
        return error_response(OciError(Code.UNKNOWN, "internal error"))


@dataclass(slots=True)  # not frozen: made on every request, and a frozen one costs more
class Answered:
    kind: str
    cache: str
    status: int
    upstream: str
    sent: int
    fields: dict[str, Any]  # the access line


def answered(
    request: web.Request, resp: web.StreamResponse, started: float, worker: int | None = None
) -> Answered:
    """``resp`` to ``request`` as counted and logged; ``started``: ``time.perf_counter()``
    when it arrived; ``worker``: which process took the connection (serve --workers)."""
    sent = request.get(keys.SENT)
    if sent is None:
        # Answers the handlers did not stream themselves (errors, tags lists, /setup, JSON):
        # the body aiohttp is about to send, none for HEAD.
        body = resp.body if isinstance(resp, web.Response) and request.method != "HEAD" else None
        sent = len(body) if isinstance(body, bytes | bytearray) else 0
    kind = request.get(keys.KIND, "other")
    cache = request.get(keys.CACHE_RESULT, "-")
    upstream = request.get(keys.UPSTREAM, "-")
    path, ns = request.path, request.query.get("ns")
    if len(path) > LOGGED_MAX:
        path = path[:LOGGED_MAX] + "…"
    if ns is not None and len(ns) > LOGGED_MAX:
        ns = ns[:LOGGED_MAX] + "…"
    fields: dict[str, Any] = {
        "method": request.method,
        "path": path,
        "ns": ns,
        "user": request.get(keys.USER),
        "status": resp.status,
        "bytes": sent,
        "cache": cache,
        "upstream": upstream,
        "aborted": request.get(keys.ABORTED, False),
        "ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if worker is not None:
        fields["worker"] = worker
    return Answered(kind, cache, resp.status, upstream, sent, fields)
