"""The HTTP client side: two connection pools for every upstream, and one client per
configured upstream, with the credentials configuration and ``docker_config`` give it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import aiohttp
import structlog
from yarl import URL

from proxy.core import jsontext
from proxy.core.config import Settings
from proxy.upstream import credentials
from proxy.upstream.client import Sessions, TokenShare, UpstreamClient
from proxy.upstream.resolver import GuardedResolver

log = structlog.get_logger("ocicache.upstream")

USER_AGENT: Final = "ocicache/0.1"
# aiohttp's client reads up to this much before pausing the socket; larger than its 64 KiB
# default so a fill keeps receiving while a worker thread writes the previous batch.
READ_BUFSIZE: Final = 2 * 1024 * 1024


@asynccontextmanager
async def upstream_clients(
    settings: Settings, shared_tokens: TokenShare | None = None
) -> AsyncIterator[dict[str, UpstreamClient]]:
    """One client per configured upstream, sharing two pools, closed on exit; ``shared_tokens``:
    tokens the replicas of a cluster share."""
    auths = await asyncio.to_thread(_read_docker_config, settings.docker_config)
    resolver = GuardedResolver(trusted_hosts(settings))
    sessions = Sessions(
        api=_session(aiohttp.TCPConnector(limit=256, limit_per_host=32, ttl_dns_cache=60, resolver=resolver)),
        # No pool limit: each upstream's blob_slots queue downloads, outside any timeout.
        blobs=_session(aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60, resolver=resolver)),
    )
    try:
        yield {
            u.name: UpstreamClient(
                u, sessions, settings, credentials.lookup(auths, u.name, u.url), shared_tokens
            )
            for u in settings.upstreams
        }
    finally:
        await sessions.api.close()
        await sessions.blobs.close()


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
        return credentials.parse_auths(jsontext.loads(path.read_bytes()))
    except (OSError, ValueError) as exc:
        log.warning("docker_config_unreadable", path=str(path), error=str(exc))
        return {}


def trusted_hosts(settings: Settings) -> frozenset[str]:
    """Hosts we were configured with: these may live at private addresses."""
    hosts = {URL(u.url).host or "" for u in settings.upstreams}
    hosts |= {h.partition(":")[0] for u in settings.upstreams for h in u.realm_hosts}
    return frozenset(h.lower() for h in hosts if h)
