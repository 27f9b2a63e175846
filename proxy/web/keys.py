"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cachetools import LRUCache

from proxy.airgap.prefetch import PrefetchReport
from proxy.cluster.cluster import Cluster
from proxy.core.config import Settings
from proxy.core.reference import PathRequest
from proxy.core.routing import Route
from proxy.flows.access import Access
from proxy.flows.engine import Engine
from proxy.flows.fills import Fills
from proxy.flows.manifests import ManifestStore
from proxy.flows.referrers import Referrers
from proxy.store.cache import BlobCache
from proxy.store.catalogue import Catalogue
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient
from proxy.web.accesslog import AccessLog
from proxy.web.lifecycle import Lifecycle
from proxy.web.metrics import Metrics
from proxy.web.pulls import Pulls
from proxy.web.samples import Samples

if TYPE_CHECKING:
    from proxy.web.guard import Guard  # which imports this module
    from proxy.web.jobs import Jobs, Prefetcher  # which import this module

SETTINGS: Final = web.AppKey("settings", Settings)
ENGINE: Final = web.AppKey("engine", Engine)
METRICS: Final = web.AppKey("metrics", Metrics)
STORAGE: Final = web.AppKey("storage", Storage)
CACHE: Final = web.AppKey("cache", BlobCache)
CATALOGUE: Final = web.AppKey("catalogue", Catalogue)
FILLS: Final = web.AppKey("fills", Fills)
MANIFESTS: Final = web.AppKey("manifests", ManifestStore)
REFERRERS: Final = web.AppKey("referrers", Referrers)
ACCESS: Final = web.AppKey("access", Access)
UPSTREAMS: Final = web.AppKey("upstreams", dict[str, UpstreamClient])
LIFECYCLE: Final = web.AppKey("lifecycle", Lifecycle)
PULLS: Final = web.AppKey("pulls", Pulls)
SAMPLES: Final = web.AppKey("samples", Samples)
JOBS: Final[web.AppKey[Jobs]] = web.AppKey("jobs")
# The air-gap layer's prefetch, handed in by whoever builds the app (None: not available).
PREFETCH: Final[web.AppKey[Prefetcher | None]] = web.AppKey("prefetch")
# serve's background fetch of pins the cache lacks (done at once when there are none).
PINS_FETCH: Final = web.AppKey("pins_fetch", asyncio.Task[PrefetchReport | None])
# (raw path, ns) -> what it asks for and of which upstream: a pure function of the key, for
# one app (its upstreams are fixed), remembered because pulls repeat the same few paths.
RESOLVED: Final = web.AppKey("resolved", LRUCache[tuple[str, str | None], tuple[PathRequest, Route]])
# Only with cluster.redis.
CLUSTER: Final = web.AppKey("cluster", Cluster)
ACCESS_LOG: Final = web.AppKey("access_log", AccessLog)
# Only when auth: is configured.
GUARD: Final[web.AppKey[Guard]] = web.AppKey("guard")

# serve --workers: what a front worker's report must carry (made per run by create_app).
WORKER_SECRET: Final = web.AppKey("worker_secret", str)

# Per-request notes for the access log line.
KIND: Final = web.RequestKey("kind", str)
CACHE_RESULT: Final = web.RequestKey("cache", str)
# The upstream a registry request was routed to (by ns=, path prefix or default).
UPSTREAM: Final = web.RequestKey("upstream", str)
SENT: Final = web.RequestKey("sent", int)
ABORTED: Final = web.RequestKey("aborted", bool)
# A request from a peer replica (carried the cluster token): the URL it says it is.
PEER: Final = web.RequestKey("peer", str)
# Relayed by a front worker over the primary's Unix socket (serve --workers).
VIA_WORKER: Final = web.RequestKey("via_worker", bool)
# With several processes: which one took the client's connection (0: the primary), logged.
WORKER: Final = web.RequestKey("worker", int)
# Between the primary and its workers: no log line, not counted (the worker logs the answer).
INTERNAL: Final = web.RequestKey("internal", bool)
# The verified user name (None: anonymous); never a credential.
USER: Final[web.RequestKey[str | None]] = web.RequestKey("user")
