"""``create_app(settings)``: routes, the one error/log middleware, and the resources the app owns
(client session, storage, cache, fills) under typed keys in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

from proxy.core.config import Settings
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError, code_for_status, error_response
from proxy.flows.access import Access
from proxy.flows.fills import Fill, Fills, State
from proxy.flows.manifests import ManifestStore
from proxy.store.cache import BlobCache, Budget
from proxy.store.catalogue import Catalogue
from proxy.store.lock import CacheLock
from proxy.store.pins import pinned_digests
from proxy.store.storage import Storage
from proxy.upstream import credentials
from proxy.upstream.client import Sessions, UpstreamClient
from proxy.upstream.resolver import GuardedResolver
from proxy.web import gate, guard, handlers, keys, login, setup
from proxy.web.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger("ocicache.access")

USER_AGENT: Final = "ocicache/0.1"
# aiohttp's client reads up to this much before pausing the socket; larger than its 64 KiB
# default so a fill keeps receiving while a worker thread writes the previous batch.
READ_BUFSIZE: Final = 2 * 1024 * 1024

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
    settings = app[keys.SETTINGS]
    metrics = app[keys.METRICS]
    lock = CacheLock(settings.cache_dir)
    await asyncio.to_thread(lock.acquire)
    storage = Storage(settings.cache_dir)
    await asyncio.to_thread(storage.prepare)
    catalogue = Catalogue(storage)
    await catalogue.open()
    await catalogue.set_pins(settings.pins, "config")
    names = [u.name for u in settings.upstreams]
    budget = Budget(
        settings.max_cache_bytes, settings.high_watermark, settings.low_watermark, settings.max_unused
    )
    cache = BlobCache(
        storage,
        catalogue,
        budget,
        lambda: pinned_digests(catalogue.pins, catalogue.tags, catalogue.manifests, names),
    )
    await cache.start()
    access = Access(catalogue)

    async def on_commit(fill: Fill) -> None:
        await access.remember(fill.upstream.name, fill.repository, fill.digest)

    def on_finish(fill: Fill) -> None:
        metrics.upstream_gets.labels(fill.upstream.name).inc(fill.upstream_gets)
        metrics.upstream_bytes.labels(fill.upstream.name).inc(fill.written)
        if fill.state is State.DONE:
            outcome = "uncached" if fill.window is not None else "committed"
        else:
            outcome = fill.error.code.value if fill.error else "failed"
        metrics.fills.labels(outcome).inc()

    fills = Fills(
        storage,
        cache,
        retries=settings.blob_retries,
        cancel_abandoned=settings.cancel_abandoned_fills,
        stall=settings.blob_read_timeout,
        on_commit=on_commit,
        on_finish=on_finish,
    )
    auths = await asyncio.to_thread(_read_docker_config, settings.docker_config)
    resolver = GuardedResolver(_trusted_hosts(settings))
    sessions = Sessions(
        api=_session(aiohttp.TCPConnector(limit=256, limit_per_host=32, ttl_dns_cache=60, resolver=resolver)),
        # No pool limit: each upstream's blob_slots queue downloads, outside any timeout.
        blobs=_session(aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60, resolver=resolver)),
    )
    app[keys.STORAGE] = storage
    app[keys.CACHE] = cache
    app[keys.ACCESS] = access
    app[keys.FILLS] = fills
    app[keys.CATALOGUE] = catalogue
    app[keys.MANIFESTS] = ManifestStore(storage, catalogue, cache, access, settings)
    app[keys.UPSTREAMS] = {
        u.name: UpstreamClient(u, sessions, settings, credentials.lookup(auths, u.name, u.url))
        for u in settings.upstreams
    }
    try:
        yield
    finally:
        try:
            await fills.close()
            await cache.close()
            await catalogue.close()
            await sessions.api.close()
            await sessions.blobs.close()
        finally:
            lock.release()


def _session(connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        auto_decompress=False,  # the bytes we hash must be the bytes upstream stored
        read_bufsize=READ_BUFSIZE,
        headers={"User-Agent": USER_AGENT},
        connector=connector,
        trust_env=False,
    )


def _read_docker_config(path: Path | None) -> dict[str, credentials.Credentials]:
    if path is None:
        return {}
    try:
        return credentials.parse_auths(json.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        log.warning("docker_config_unreadable", path=str(path), error=str(exc))
        return {}


def _trusted_hosts(settings: Settings) -> frozenset[str]:
    """Hosts we were configured with: these may live at private addresses."""
    hosts = {URL(u.url).host or "" for u in settings.upstreams}
    hosts |= {h.partition(":")[0] for u in settings.upstreams for h in u.realm_hosts}
    return frozenset(h.lower() for h in hosts if h)


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [errors_and_access_log]
    if settings.auth.enabled:
        # Inside the error middleware, so refusals get the envelope and a log line.
        middlewares.append(gate.middleware(public=(metrics_endpoint, healthz, setup.setup, login.token)))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = Metrics()
    app.cleanup_ctx.append(_resources)
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
