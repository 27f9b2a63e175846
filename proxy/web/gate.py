"""The guard (:mod:`proxy.web.guard`) applied to the app's routes, and its life in the app.

Runs after routing and before any handler: a refused request never reaches a handler and never
opens an upstream connection. The ``public`` handlers (``/setup/*``, ``/healthz``,
``/metrics``, the token endpoint) pass; every other route needs what ``auth`` asks for, and
the pull API (``/v2/<name>/...``) is also held to the rules, which need the routed upstream
and repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from proxy.core import authorization
from proxy.core.errors import Code, OciError
from proxy.core.reference import parse_path
from proxy.core.routing import route
from proxy.core.tokens import TokenSigner
from proxy.web import handlers, keys
from proxy.web.accountfiles import AccountFiles
from proxy.web.guard import ANONYMOUS, Guard

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(public: Collection[Handler]) -> Middleware:
    """The check, for every route but the ``public`` handlers."""
    open_handlers = frozenset(public)

    @web.middleware
    async def client_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = request.match_info.handler
        if target in open_handlers or keys.PEER in request:
            # A peer replica proved itself with the cluster token (proxy.web.peering).
            return await handler(request)
        guard = request.app[keys.GUARD]
        principal = await guard.principal(request)
        if principal is None:
            if guard.logins and (not guard.auth.anonymous or target is handlers.base):
                # The base endpoint always challenges a client that sent nothing: Docker
                # learns there how to log in (docker login, and the token for each pull).
                raise guard.unauthorized(request, "authentication required")
            principal = ANONYMOUS
        request[keys.USER] = principal.user
        if (
            target is handlers.registry_api
            and guard.rules
            and request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
        ):
            parsed = parse_path(request.rel_url.raw_path)
            settings = request.app[keys.SETTINGS]
            where = route(
                parsed.name,
                request.query.get("ns"),
                request.app[keys.UPSTREAMS].keys(),
                settings.default_upstream.name,
            )
            if not guard.rules.allows(principal.user, where.upstream, where.repository):
                if principal.user is None and guard.logins:
                    raise guard.unauthorized(
                        request, "authentication required", authorization.pull_scope(parsed.name)
                    )
                raise OciError(
                    Code.DENIED, "not allowed to pull this repository", {"repository": parsed.name}
                )
        return await handler(request)

    return client_auth


async def resources(app: web.Application) -> AsyncIterator[None]:
    """The guard, its worker threads and its file watcher, for the app's life."""
    auth = app[keys.SETTINGS].auth
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ocicache-auth")
    try:
        files = AccountFiles(auth)
        accounts = await asyncio.get_running_loop().run_in_executor(executor, files.load)
        # A fresh key per process: tokens never outlive it, and it is never written down.
        signer = TokenSigner(secrets.token_bytes(32), auth.token_ttl)
        failures = app[keys.METRICS].auth_failures
        app[keys.GUARD] = guard = Guard(
            auth,
            files,
            accounts,
            signer,
            executor,
            listen_port=app[keys.SETTINGS].listen_port,
            on_refusal=lambda reason: failures.labels(reason).inc(),
        )
        watcher = asyncio.create_task(guard.watch() if auth.logins else asyncio.Event().wait())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await guard.close()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
