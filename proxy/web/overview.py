"""What the cache is doing, in one value: for ``GET /admin/v1/stats`` and the status page.

Everything is read from what the app already keeps (the metrics' counters, the catalogue, the
fills, the upstream clients' health, the samples), when asked: nothing is kept for it per
request. ``visible(upstream, repository)`` leaves out what the viewer may not see (the status
page under ``auth.rules``); the admin API sees everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

from aiohttp import web

from proxy.core.imageref import BadReference, parse_image_reference
from proxy.store.images import rows_of
from proxy.upstream.failures import Failure
from proxy.web import keys
from proxy.web.metrics import FROM_CACHE, FROM_UPSTREAM
from proxy.web.samples import Bar, Sample, bars, per_minute, ratio, window

TOP_IMAGES: Final = 20
FILLS_SHOWN: Final = 50
HOUR: Final = 3600.0

Visible = Callable[[str, str], bool]


def everything(upstream: str, repository: str) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class ImageView:
    reference: str
    pulls: int
    hits: int
    misses: int
    size: int | None  # on disk, if the cache holds it


@dataclass(frozen=True, slots=True)
class FillView:
    digest: str
    upstream: str
    repository: str
    written: int
    size: int | None
    readers: int


@dataclass(frozen=True, slots=True)
class UpstreamView:
    name: str
    host: str
    last_success: float | None
    last_failure: Failure | None
    ratelimit_remaining: str | None


@dataclass(frozen=True, slots=True)
class PinView:
    reference: str
    source: str  # config | admin


@dataclass(frozen=True)
class Overview:
    now: float
    uptime: float
    cache_bytes: int
    budget: int
    blobs: int
    tags: int
    evictions: int
    evicted_bytes: int
    purged: int
    purged_bytes: int
    requests: dict[str, float]  # by cache result
    bytes: dict[str, float]
    cached_requests: float
    upstream_requests: float
    cached_bytes: float
    served_bytes: float
    upstream_bytes: float
    ratio_requests: float | None
    ratio_bytes: float | None
    hour_ratio_requests: float | None
    hour_ratio_bytes: float | None
    chart: list[Bar]
    top_images: list[ImageView]
    fills: list[FillView]
    fills_hidden: int
    upstreams: list[UpstreamView]
    pins: list[PinView]
    offline: bool

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["chart"]
        return doc


def overview(app: web.Application, visible: Visible = everything) -> Overview:
    now = time.time()
    metrics = app[keys.METRICS]
    cache = app[keys.CACHE]
    catalogue = app[keys.CATALOGUE]
    settings = app[keys.SETTINGS]
    totals = metrics.totals()
    cached_requests = totals.requests_in(FROM_CACHE)
    upstream_requests = totals.requests_in(FROM_UPSTREAM)
    cached_bytes = totals.bytes_in(FROM_CACHE)
    served = totals.bytes_in(FROM_CACHE | FROM_UPSTREAM)
    current = Sample(
        now, cached_requests, cached_requests + upstream_requests, cached_bytes, served, totals.upstream_bytes
    )
    samples = app[keys.SAMPLES].all()
    hour = window(samples, current, HOUR)

    top: list[ImageView] = []
    pinned = app[keys.ENGINE].pinned()
    for (upstream, repository, tag), count in app[keys.PULLS].top(TOP_IMAGES * 4):
        if len(top) >= TOP_IMAGES or not visible(upstream, repository):
            continue
        answers = catalogue.tags.get((upstream, repository, tag))
        rows = (
            rows_of({(upstream, repository, tag): answers}, catalogue.manifests, catalogue.blobs, pinned)
            if answers
            else []
        )
        top.append(
            ImageView(
                f"{upstream}/{repository}:{tag}",
                count.pulls,
                count.hits,
                count.misses,
                rows[0].size if rows else None,
            )
        )

    fills = [f for f in app[keys.FILLS].running() if visible(f.upstream.name, f.repository)]
    fill_views = [
        FillView(str(f.digest), f.upstream.name, f.repository, f.written, f.size, f.users)
        for f in fills[:FILLS_SHOWN]
    ]

    names = [u.name for u in settings.upstreams]
    pins = []
    for reference, source in sorted(catalogue.pins.items()):
        try:
            ref = parse_image_reference(reference, names, names[0])
        except BadReference:
            continue
        if visible(ref.upstream, ref.repository):
            pins.append(PinView(reference, source))

    upstreams = [
        UpstreamView(c.name, c.host, c.health.last_success, c.health.last_failure, c.ratelimit_remaining)
        for c in app[keys.UPSTREAMS].values()
    ]
    return Overview(
        now=now,
        uptime=now - app[keys.LIFECYCLE].started,
        cache_bytes=cache.total,
        budget=cache.max_bytes,
        blobs=len(cache),
        tags=len(catalogue.tags),
        evictions=cache.evicted,
        evicted_bytes=cache.evicted_bytes,
        purged=cache.purged,
        purged_bytes=cache.purged_bytes,
        requests=dict(sorted(totals.requests.items())),
        bytes=dict(sorted(totals.bytes.items())),
        cached_requests=cached_requests,
        upstream_requests=upstream_requests,
        cached_bytes=cached_bytes,
        served_bytes=served,
        upstream_bytes=totals.upstream_bytes,
        ratio_requests=ratio(cached_requests, cached_requests + upstream_requests),
        ratio_bytes=ratio(cached_bytes, served),
        hour_ratio_requests=ratio(hour[0], hour[1]),
        hour_ratio_bytes=ratio(hour[2], hour[3]),
        chart=bars(per_minute(samples, current)),
        top_images=top,
        fills=fill_views,
        fills_hidden=len(fills) - len(fill_views),
        upstreams=upstreams,
        pins=pins,
        offline=settings.offline,
    )


def sample(app: web.Application) -> Sample:
    """The counters now, as one sample for the chart."""
    totals = app[keys.METRICS].totals()
    cached = totals.requests_in(FROM_CACHE)
    return Sample(
        time.time(),
        cached,
        cached + totals.requests_in(FROM_UPSTREAM),
        totals.bytes_in(FROM_CACHE),
        totals.bytes_in(FROM_CACHE | FROM_UPSTREAM),
        totals.upstream_bytes,
    )
