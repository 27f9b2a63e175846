"""What readiness says of the cluster: a replica whose Redis is down is still ready (it serves
its cache and fetches alone) but degraded, and says why. For ``/readyz``."""

from __future__ import annotations

from aiohttp import web

from proxy.web import keys


def cluster_status(app: web.Application) -> dict[str, str] | None:
    """None without a cluster; else the mode (``cluster`` or ``degraded``) and Redis's state."""
    cluster = app.get(keys.CLUSTER)
    if cluster is None:
        return None
    if cluster.up:
        return {"mode": "cluster", "redis": "up", "advertise": cluster.me}
    return {
        "mode": "degraded",
        "redis": "down",
        "advertise": cluster.me,
        "detail": "Redis unreachable: serving this replica's cache, fetching alone",
    }
