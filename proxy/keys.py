"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from .access import Access
from .cache import BlobCache
from .config import Settings
from .fills import Fills
from .manifests import ManifestStore
from .metrics import Metrics
from .storage import Storage
from .upstream import UpstreamClient

SETTINGS: Final = web.AppKey("settings", Settings)
METRICS: Final = web.AppKey("metrics", Metrics)
STORAGE: Final = web.AppKey("storage", Storage)
CACHE: Final = web.AppKey("cache", BlobCache)
FILLS: Final = web.AppKey("fills", Fills)
MANIFESTS: Final = web.AppKey("manifests", ManifestStore)
ACCESS: Final = web.AppKey("access", Access)
UPSTREAMS: Final = web.AppKey("upstreams", dict[str, UpstreamClient])

# Per-request notes for the access log line (request-scoped dict keys).
KIND: Final = "ocicache.kind"
CACHE_RESULT: Final = "ocicache.cache"
SENT: Final = "ocicache.sent"
ABORTED: Final = "ocicache.aborted"
