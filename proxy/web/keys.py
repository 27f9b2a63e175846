"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cachetools import LRUCache

from proxy.airgap.prefetch import PrefetchReport
from proxy.core.config import Settings
from proxy.core.reference import PathRequest
from proxy.core.routing import Route
from proxy.flows.access import Access
from proxy.flows.engine import Engine
from proxy.flows.fills import Fills
from proxy.flows.manifests import ManifestStore
from proxy.store.cache import BlobCache
from proxy.store.catalogue import Catalogue
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient
from proxy.web.metrics import Metrics

if TYPE_CHECKING:
    from proxy.web.guard import Guard  # which imports this module

SETTINGS: Final = web.AppKey("settings", Settings)
ENGINE: Final = web.AppKey("engine", Engine)
METRICS: Final = web.AppKey("metrics", Metrics)
STORAGE: Final = web.AppKey("storage", Storage)
CACHE: Final = web.AppKey("cache", BlobCache)
CATALOGUE: Final = web.AppKey("catalogue", Catalogue)
FILLS: Final = web.AppKey("fills", Fills)
MANIFESTS: Final = web.AppKey("manifests", ManifestStore)
ACCESS: Final = web.AppKey("access", Access)
UPSTREAMS: Final = web.AppKey("upstreams", dict[str, UpstreamClient])
# serve's background fetch of pins the cache lacks (done at once when there are none).
PINS_FETCH: Final = web.AppKey("pins_fetch", asyncio.Task[PrefetchReport | None])
# (raw path, ns) -> what it asks for and of which upstream: a pure function of the key, for
# one app (its upstreams are fixed), remembered because pulls repeat the same few paths.
RESOLVED: Final = web.AppKey("resolved", LRUCache[tuple[str, str | None], tuple[PathRequest, Route]])
# Only when auth: is configured.
GUARD: Final[web.AppKey[Guard]] = web.AppKey("guard")

# Per-request notes for the access log line.
KIND: Final = web.RequestKey("kind", str)
CACHE_RESULT: Final = web.RequestKey("cache", str)
SENT: Final = web.RequestKey("sent", int)
ABORTED: Final = web.RequestKey("aborted", bool)
# The verified user name (None: anonymous); never a credential.
USER: Final[web.RequestKey[str | None]] = web.RequestKey("user")
