"""Every Prometheus metric, defined once, on a registry per application (no global state, so
that tests can run many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ocicache_requests",
            "Client requests by endpoint kind, cache result and status",
            ["kind", "cache", "status"],
            registry=r,
        )
        self.served_bytes = Counter(
            "ocicache_served_bytes", "Body bytes sent to clients", ["cache"], registry=r
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
        self.fills = Counter("ocicache_fills", "Finished blob downloads by outcome", ["outcome"], registry=r)
        self.fills_active = Gauge("ocicache_fills_active", "Blob downloads in progress", registry=r)
        self.cache_bytes = Gauge("ocicache_cache_bytes", "Bytes held in the blob cache", registry=r)
        self.cache_blobs = Gauge("ocicache_cache_blobs", "Blobs held in the blob cache", registry=r)
        self.ratelimit_remaining = Gauge(
            "ocicache_upstream_ratelimit_remaining",
            "Last ratelimit-remaining an upstream reported",
            ["upstream"],
            registry=r,
        )

        self.connections = Gauge("ocicache_connections", "Client connections open", registry=r)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
