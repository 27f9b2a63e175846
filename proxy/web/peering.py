"""Peer replicas' requests, told apart from clients' before client authentication runs.

A request carrying the cluster token (``Authorization: Bearer``) is a peer's: it skips client
authentication and rules (its replica applied them to its own client) and is served only what
this replica holds or fetches from upstream (:mod:`proxy.web.blobs`). A request that says it is
a peer's (``X-Ocicache-Peer``) without the right token, or reaches a proxy that is not in a
cluster, is refused with a 401 and counted: the token is never optional.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.core.errors import Code, OciError
from proxy.core.peering import PEER_HEADER, is_peer
from proxy.web import handlers, keys

log = structlog.get_logger("ocicache.cluster")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware() -> Middleware:
    @web.middleware
    async def peers(request: web.Request, handler: Handler) -> web.StreamResponse:
        claims = PEER_HEADER in request.headers
        cluster = request.app.get(keys.CLUSTER)
        token = "" if cluster is None else cluster.cfg.token
        if is_peer(request.headers.get("Authorization"), token):
            if request.match_info.handler is handlers.registry_api:
                request[keys.PEER] = request.headers.get(PEER_HEADER, "?")[:200]
            return await handler(request)
        if claims:
            if cluster is not None:
                cluster.note("peer_refused")
            log.warning("peer_refused", remote=request.remote, claimed=request.headers[PEER_HEADER][:200])
            raise OciError(Code.UNAUTHORIZED, "peer requests need the cluster token")
        return await handler(request)

    return peers
