"""``create_app(settings)``: routes, the one error/log middleware, and the resources the app owns
(client session, storage, cache, fills) under typed keys in ``cleanup_ctx``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import web
from aiohttp.typedefs import Middleware
from cachetools import LRUCache
from prometheus_client.core import GaugeMetricFamily, Metric

from proxy.airgap.pinfetch import fetch_missing_pins
from proxy.airgap.prefetch import prefetch as real_prefetch
from proxy.core.config import Settings
from proxy.core.digits import parse_count
from proxy.flows.engine import Engine, running
from proxy.flows.fills import Fill, State
from proxy.web import admin, gate, guard, handlers, health, keys, login, peering, setup, status, workerlink
from proxy.web.accesslog import AccessLog, ThroughStructlog
from proxy.web.answered import Handler, answer, answered
from proxy.web.jobs import Jobs, Prefetcher
from proxy.web.lifecycle import Lifecycle
from proxy.web.metrics import CONTENT_TYPE, Metrics, UpstreamMetrics, counter, gauge
from proxy.web.overview import sample
from proxy.web.pulls import Pulls
from proxy.web.samples import Samples


def errors_and_access_log(workers: bool) -> Middleware:
    """Every error becomes the OCI envelope; every request becomes one log line. ``workers``:
    serve runs several processes (the lines say which, and their own talk is not logged)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resp = await answer(request, handler)
        if not workers:
            return _logged(request, resp, started, None)
        if request.get(keys.INTERNAL):
            return resp  # the primary and a worker talking: the worker logs the answer
        return _logged(request, resp, started, request.get(keys.WORKER))

    return middleware


def _logged(
    request: web.Request, resp: web.StreamResponse, started: float, worker: int | None
) -> web.StreamResponse:
    done = answered(request, resp, started, worker)
    request.app[keys.METRICS].count(done.kind, done.cache, done.status, done.upstream, done.sent)
    if (
        keys.PEER in request
        and done.kind == "blobs"
        and done.status in (200, 206)
        and not request.get(keys.ABORTED)
    ):
        cluster = request.app[keys.CLUSTER]
        cluster.note("peer_served_blobs")
        cluster.note("peer_served_bytes", done.sent)
    request.app[keys.ACCESS_LOG].write(done.fields)
    return resp


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[keys.METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def engine_metrics(engine: Engine) -> Callable[[], Iterator[Metric]]:
    """What /metrics reads from the engine when scraped."""

    def collect() -> Iterator[Metric]:
        cache = engine.cache
        yield gauge("ocicache_cache_bytes", "Bytes held in the blob cache", cache.total)
        yield gauge("ocicache_cache_blobs", "Blobs held in the blob cache", len(cache))
        yield gauge(
            "ocicache_cache_budget_bytes",
            "The disk budget in force (lowered to the disk if larger)",
            cache.max_bytes,
        )
        yield counter(
            "ocicache_evictions", "Files removed to keep within the budget or max_unused", cache.evicted
        )
        yield counter("ocicache_evicted_bytes", "Bytes of the files evicted", cache.evicted_bytes)
        yield counter(
            "ocicache_purges", "Files removed by an operator (admin API, ocicache rm)", cache.purged
        )
        yield counter("ocicache_purged_bytes", "Bytes of the files purged", cache.purged_bytes)
        yield gauge("ocicache_fills_active", "Blob downloads in progress", len(engine.fills))
        limits = [
            (up.name, value)
            for up in engine.upstreams.values()
            if up.ratelimit_remaining is not None
            and (value := parse_count(up.ratelimit_remaining.split(";")[0].strip())) is not None
        ]
        if limits:
            family = GaugeMetricFamily(
                "ocicache_upstream_ratelimit_remaining",
                "Last ratelimit-remaining an upstream reported",
                labels=["upstream"],
            )
            for name, value in limits:
                family.add_metric([name], value)
            yield family

    return collect


async def _flush_access(app: web.Application) -> None:
    app[keys.ACCESS_LOG].flush()


async def _stop_fills(app: web.Application) -> None:
    # Before aiohttp waits for running handlers: readers tailing a fill end (aborted) now,
    # instead of holding shutdown until its timeout.
    app[keys.LIFECYCLE].stopping = True
    await app[keys.JOBS].close()
    await app[keys.FILLS].close()


async def _sampler(app: web.Application) -> None:
    samples = app[keys.SAMPLES]
    while True:
        samples.add(sample(app))
        await asyncio.sleep(samples.every)


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

    async with running(app[keys.SETTINGS], on_fill_finish=on_finish, serving=True) as engine:
        app[keys.ENGINE] = engine
        app[keys.STORAGE] = engine.storage
        app[keys.CACHE] = engine.cache
        app[keys.ACCESS] = engine.access
        app[keys.FILLS] = engine.fills
        app[keys.CATALOGUE] = engine.catalogue
        app[keys.MANIFESTS] = engine.manifests
        app[keys.REFERRERS] = engine.referrers
        app[keys.UPSTREAMS] = engine.upstreams
        if engine.cluster is not None:
            app[keys.CLUSTER] = cluster = engine.cluster
            events = metrics.cluster_events
            cluster.observers.append(lambda event, amount: events.labels(event).inc(amount))
            metrics.cluster_redis_up.set(1 if cluster.up else 0)
            cluster.state.observers.append(lambda up: metrics.cluster_redis_up.set(1 if up else 0))
        observer = UpstreamMetrics(metrics)
        for client in engine.upstreams.values():
            client.observer = observer
        app[keys.JOBS] = jobs = Jobs(engine, app[keys.PREFETCH])
        metrics.live.sources[:] = [engine_metrics(engine), jobs.metrics]
        sampler = asyncio.get_running_loop().create_task(_sampler(app), name="status samples")
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await jobs.close()
            metrics.live.sources.clear()


async def _pins(app: web.Application) -> AsyncIterator[None]:
    """Pins the cache lacks are fetched in the background while the proxy serves."""
    task = asyncio.get_running_loop().create_task(fetch_missing_pins(app[keys.ENGINE]), name="pins")
    app[keys.PINS_FETCH] = task
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def create_app(
    settings: Settings, *, prefetch: Prefetcher | None = None, access: AccessLog | None = None
) -> web.Application:
    """``prefetch``: what ``POST /admin/v1/prefetch`` runs (the air-gap layer's, unless a test
    hands in its own); ``access``: where request lines go (structlog unless ``serve`` chose
    the batched JSON writer)."""
    workers = settings.processes > 1
    middlewares: list[Middleware] = [errors_and_access_log(workers)]
    public: tuple[Handler, ...] = (
        metrics_endpoint,
        health.healthz,
        health.readyz,
        setup.setup,
        login.token,
        status.status_page,
        # The admin API checks its own token (not a client login).
        *admin.HANDLERS,
    )
    if workers:
        public = (*public, workerlink.report)
        # Outermost: the rest sees a relayed request as the client's own.
        middlewares.insert(0, workerlink.middleware)
    if settings.cluster.enabled:
        # Before client auth: a peer's request proves itself with the cluster token instead.
        middlewares.append(peering.middleware())
    if settings.auth.enabled:
        # Inside the error middleware, so refusals get the envelope and a log line.
        middlewares.append(gate.middleware(public=public))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = Metrics()
    app[keys.LIFECYCLE] = Lifecycle()
    app[keys.PULLS] = Pulls()
    app[keys.SAMPLES] = Samples()
    app[keys.PREFETCH] = real_prefetch if prefetch is None else prefetch
    app[keys.ACCESS_LOG] = ThroughStructlog() if access is None else access
    status.templates(app)
    app[keys.RESOLVED] = LRUCache(maxsize=8192)
    if workers:
        app[keys.WORKER_SECRET] = secrets.token_hex(16)
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_pins)
    if settings.auth.enabled:
        app.cleanup_ctx.append(gate.resources)
    app.on_shutdown.append(_stop_fills)
    app.on_cleanup.append(_flush_access)
    app.router.add_route("*", "/v2/", handlers.base)
    app.router.add_route("*", "/v2/{tail:.*}", handlers.registry_api)
    if workers:
        app.router.add_post(workerlink.REPORT_PATH, workerlink.report)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/setup/{client}", setup.setup)
    app.router.add_get("/", status.status_page)
    if settings.admin_token is not None:
        admin.add_routes(app, settings.admin_token)
    if settings.auth.logins:
        app.router.add_route("*", guard.TOKEN_PATH, login.token)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app
