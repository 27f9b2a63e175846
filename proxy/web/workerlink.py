"""The primary's side of ``serve --workers``: requests its front workers relay over its Unix
socket (see :mod:`proxy.workers`).

Such a request says which client it is for (address and scheme) in headers that are read
from no other listener, so limits, log lines and ``/setup``'s URLs are the client's; and the
workers' counts of the answers they gave themselves arrive at :func:`report`.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.web import keys
from proxy.web.address import RELAYED_PORT
from proxy.workers import internal, tally

REPORT_PATH = "/_ocicache/workers/report"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def over_unix_socket(request: web.BaseRequest) -> bool:
    transport = request.transport
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


def _address(value: str | None) -> str | None:
    if value is None or len(value) > 64:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: a relayed request becomes the client's own before anything reads it."""
    if not over_unix_socket(request):
        request[keys.WORKER] = 0
        return await handler(request)
    if internal.PROBE in request.headers:
        # Not a client's request but a worker's question: the answer the worker then gives
        # (or the request it relays) is the one logged and counted.
        request[keys.INTERNAL] = True
    scheme = request.headers.get(internal.SCHEME)
    headers = request.headers
    if internal.NO_HOST in headers:
        # The client sent no Host; the relay had to. Addresses we name must not use its.
        headers = CIMultiDictProxy(CIMultiDict((k, v) for k, v in headers.items() if k.lower() != "host"))
    relayed = request.clone(
        headers=headers,
        remote=_address(request.headers.get(internal.CLIENT)) or "unknown",
        scheme=scheme if scheme in ("http", "https") else "http",
    )
    relayed[keys.VIA_WORKER] = True
    index = parse_count(request.headers.get(internal.WORKER, ""))
    relayed[keys.WORKER] = index if index is not None and index < 1000 else -1
    port = parse_count(request.headers.get(internal.PORT, ""))
    if port is not None and 0 < port < 65536:
        relayed[RELAYED_PORT] = port
    if request.get(keys.INTERNAL):
        relayed[keys.INTERNAL] = True
    resp = await handler(relayed)
    user = relayed.get(keys.USER)
    if user is not None and not resp.prepared:
        resp.headers[internal.USER] = user  # for the line the worker logs of its own answers
    return resp


async def report(request: web.Request) -> web.Response:
    """A worker's counts since its last report (:mod:`proxy.workers.tally`)."""
    secret = request.app.get(keys.WORKER_SECRET)
    given = request.headers.get(internal.SECRET, "")
    if not request.get(keys.VIA_WORKER) or secret is None or not hmac.compare_digest(given, secret):
        raise OciError(Code.NAME_UNKNOWN, "no such endpoint")
    request[keys.INTERNAL] = True
    try:
        report = tally.parse(await request.read())
    except tally.BadReport as exc:
        raise OciError(Code.REQUEST_INVALID, str(exc)) from None
    metrics, counts = request.app[keys.METRICS], request.app[keys.PULLS]
    for (kind, cache, status, upstream), n, sent in report.requests:
        metrics.count(kind, cache, status, upstream, sent, n)
    for (upstream, repository, tag, source), n in report.pulls:
        counts.count(upstream, repository, tag, source, n)
    worker = request.get(keys.WORKER, -1)
    if worker > 0:
        metrics.worker_connections[worker] = report.connections
    for reason, n in report.refused.items():
        metrics.connections_refused.labels(reason).inc(n)
    return web.Response(status=204)
