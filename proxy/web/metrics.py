"""Every Prometheus metric, defined once, on a registry per application (no global state, so
that tests can run many apps in one process).

Per request the app pays for one lookup of the request's label set and two counter
increments (:meth:`Metrics.count`): the label children are looked up once per distinct set and
kept. What can be read when scraped (cache size, budget, evictions, fills and prefetch jobs in
flight, rate limits) is read then, by :class:`Live`, instead of being kept up to date.
Upstream exchanges (cold paths only) are timed into a histogram and their failures counted.
The ``_created`` series prometheus_client adds to every counter and histogram are left out of
what is served: they double the series count and no dashboard here reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

from proxy.upstream.failures import Cause

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Upstream exchanges: a cached token is milliseconds, a blob behind a slow CDN seconds.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Cache results a request was answered from without upstream's bytes.
FROM_CACHE: Final = frozenset({"hit", "stale", "revalidated", "offline"})
# ... and those that needed them.
FROM_UPSTREAM: Final = frozenset({"miss", "join", "pass", "uncached", "lazy"})


class Totals:
    """Requests and body bytes by cache result, summed over the other labels."""

    __slots__ = ("bytes", "requests", "upstream_bytes")

    def __init__(self) -> None:
        self.requests: dict[str, float] = {}
        self.bytes: dict[str, float] = {}
        self.upstream_bytes = 0.0

    def requests_in(self, results: Iterable[str]) -> float:
        return sum(self.requests.get(r, 0.0) for r in results)

    def bytes_in(self, results: Iterable[str]) -> float:
        return sum(self.bytes.get(r, 0.0) for r in results)


class Live(Collector):
    """Values read when scraped, from whatever the app binds (nothing until it does)."""

    def __init__(self) -> None:
        self.sources: list[Callable[[], Iterable[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


class _WithoutCreated(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ocicache_requests",
            "Client requests by endpoint kind, cache result, status and upstream",
            ["kind", "cache", "status", "upstream"],
            registry=r,
        )
        self.served_bytes = Counter(
            "ocicache_served_bytes", "Body bytes sent to clients", ["cache", "upstream"], registry=r
        )
        self.upstream_gets = Counter(
            "ocicache_upstream_blob_gets",
            "Blob GETs sent upstream (resumptions included)",
            ["upstream"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "ocicache_upstream_blob_bytes",
            "Blob bytes received from upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_manifest_bytes = Counter(
            "ocicache_upstream_manifest_bytes",
            "Manifest bytes received from upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "ocicache_upstream_request_seconds",
            "Time from sending a request upstream to its answer's headers (redirects followed)",
            ["upstream", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "ocicache_upstream_errors",
            "Failed upstream exchanges by cause (refused, timeout, tls, dns, unreachable, reset, "
            "connection, http_<status>, bad_answer)",
            ["upstream", "cause"],
            registry=r,
        )
        self.fills = Counter("ocicache_fills", "Finished blob downloads by outcome", ["outcome"], registry=r)

        self.connections = Gauge(
            "ocicache_connections", "Client connections open, in every process", registry=r
        )
        self.open_connections = 0  # this process's
        # What each front worker said it holds at its last report (serve --workers).
        self.worker_connections: dict[int, int] = {}
        self.connections.set_function(lambda: self.open_connections + sum(self.worker_connections.values()))
        self.connections_refused = Counter(
            "ocicache_connections_refused",
            "Client connections closed by a limit: address_limit, header_timeout",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "ocicache_auth_failures",
            "Client logins refused: invalid credentials, or an address out of attempts",
            ["reason"],
            registry=r,
        )
        self.cluster_events = Counter(
            "ocicache_cluster",
            "Replica events: leases taken, lost and taken over; blobs and bytes served to and "
            "fetched from peers; peers that sent bad bytes; peer requests refused",
            ["event"],
            registry=r,
        )
        self.cluster_redis_up = Gauge(
            "ocicache_cluster_redis_up",
            "1 while Redis answers (replicas share state), 0 while this replica runs on alone",
            registry=r,
        )
        self.live = Live()
        r.register(self.live)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._view = _WithoutCreated(r)
        self._children: dict[tuple[str, str, int, str], tuple[Counter, Counter]] = {}

    def count(self, kind: str, cache: str, status: int, upstream: str, sent: int, n: int = 1) -> None:
        """One answered request (or ``n`` of them, ``sent`` bytes in all: a front worker's
        report): the warm paths' whole cost in metrics."""
        key = (kind, cache, status, upstream)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (
                self.requests.labels(kind, cache, str(status), upstream),
                self.served_bytes.labels(cache, upstream),
            )
        pair[0].inc(n)
        if sent:
            pair[1].inc(sent)

    def totals(self) -> Totals:
        """Requests and bytes by cache result, and bytes fetched upstream (for people)."""
        totals = Totals()
        for metric, into in ((self.requests, totals.requests), (self.served_bytes, totals.bytes)):
            for family in metric.collect():
                for s in family.samples:
                    if s.name.endswith("_total"):
                        into[s.labels["cache"]] = into.get(s.labels["cache"], 0.0) + s.value
        for metric in (self.upstream_bytes, self.upstream_manifest_bytes):
            for family in metric.collect():
                totals.upstream_bytes += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return totals

    def render(self) -> bytes:
        return generate_latest(self._view)


class UpstreamMetrics:
    """The upstream layer's :class:`~proxy.upstream.failures.Observer`, into these metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def exchanged(self, upstream: str, operation: str, seconds: float) -> None:
        self._m.upstream_seconds.labels(upstream, operation).observe(seconds)

    def failed(self, upstream: str, operation: str, cause: Cause) -> None:
        self._m.upstream_errors.labels(upstream, cause.label).inc()

    def received(self, upstream: str, operation: str, size: int) -> None:
        if operation != "blob":
            self._m.upstream_manifest_bytes.labels(upstream).inc(size)


def gauge(name: str, documentation: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels or {}))
    if labels:
        family.add_metric(list(labels.values()), value)
    else:
        family.add_metric([], value)
    return family


def counter(name: str, documentation: str, value: float) -> Metric:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
