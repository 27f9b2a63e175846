"""``create_app(settings)``: routes, the one error/log middleware, and the resources the app owns
(client session, storage, cache, fills) under typed keys in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from cachetools import LRUCache

from proxy.airgap.pinfetch import fetch_missing_pins
from proxy.core.config import Settings
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError, code_for_status, error_response
from proxy.flows.engine import running
from proxy.flows.fills import Fill, State
from proxy.web import gate, guard, handlers, keys, login, setup
from proxy.web.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger("ocicache.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_and_access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes the OCI envelope; every request becomes one log line."""
    started = time.perf_counter()
    try:
        resp = await handler(request)
    except OciError as err:
        resp = error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(OciError(code_for_status(exc.status), exc.reason))
    except Exception:
        log.exception("handler_crashed", method=request.method, path=request.path)
        resp = error_response(OciError(Code.UNKNOWN, "internal error"))
    status = resp.status
    cache = request.get(keys.CACHE_RESULT, "-")
    kind = request.get(keys.KIND, "other")
    metrics = request.app[keys.METRICS]
    metrics.requests.labels(kind, cache, str(status)).inc()
    sent = request.get(keys.SENT, 0)
    metrics.served_bytes.labels(cache).inc(sent)
    log.info(
        "request",
        method=request.method,
        path=request.path,
        ns=request.query.get("ns"),
        user=request.get(keys.USER),
        status=status,
        bytes=sent,
        cache=cache,
        aborted=request.get(keys.ABORTED, False),
        ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return resp


async def metrics_endpoint(request: web.Request) -> web.Response:
    m = request.app[keys.METRICS]
    cache = request.app[keys.CACHE]
    m.cache_bytes.set(cache.total)
    m.cache_blobs.set(len(cache))
    m.fills_active.set(len(request.app[keys.FILLS]))
    for up in request.app[keys.UPSTREAMS].values():
        if up.ratelimit_remaining is not None:
            value = parse_count(up.ratelimit_remaining.split(";")[0].strip())
            if value is not None:
                m.ratelimit_remaining.labels(up.name).set(value)
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _stop_fills(app: web.Application) -> None:
    # Before aiohttp waits for running handlers: readers tailing a fill end (aborted) now,
    # instead of holding shutdown until its timeout.
    await app[keys.FILLS].close()


async def _resources(app: web.Application) -> AsyncIterator[None]:
    metrics = app[keys.METRICS]

    def on_finish(fill: Fill) -> None:
        metrics.upstream_gets.labels(fill.upstream.name).inc(fill.upstream_gets)
        metrics.upstream_bytes.labels(fill.upstream.name).inc(fill.written)
        if fill.state is State.DONE:
            outcome = "uncached" if fill.window is not None else "committed"
        else:
            outcome = fill.error.code.value if fill.error else "failed"
        metrics.fills.labels(outcome).inc()

    async with running(app[keys.SETTINGS], on_fill_finish=on_finish) as engine:
        app[keys.ENGINE] = engine
        app[keys.STORAGE] = engine.storage
        app[keys.CACHE] = engine.cache
        app[keys.ACCESS] = engine.access
        app[keys.FILLS] = engine.fills
        app[keys.CATALOGUE] = engine.catalogue
        app[keys.MANIFESTS] = engine.manifests
        app[keys.UPSTREAMS] = engine.upstreams
        yield


async def _pins(app: web.Application) -> AsyncIterator[None]:
    """Pins the cache lacks are fetched in the background while the proxy serves."""
    task = asyncio.get_running_loop().create_task(fetch_missing_pins(app[keys.ENGINE]), name="pins")
    app[keys.PINS_FETCH] = task
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [errors_and_access_log]
    if settings.auth.enabled:
        # Inside the error middleware, so refusals get the envelope and a log line.
        middlewares.append(gate.middleware(public=(metrics_endpoint, healthz, setup.setup, login.token)))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = Metrics()
    app[keys.RESOLVED] = LRUCache(maxsize=8192)
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_pins)
    if settings.auth.enabled:
        app.cleanup_ctx.append(gate.resources)
    app.on_shutdown.append(_stop_fills)
    app.router.add_route("*", "/v2/", handlers.base)
    app.router.add_route("*", "/v2/{tail:.*}", handlers.registry_api)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/setup/{client}", setup.setup)
    if settings.auth.logins:
        app.router.add_route("*", guard.TOKEN_PATH, login.token)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app
