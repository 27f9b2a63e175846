"""The name resolver for every upstream connection: it refuses to resolve into private space."""

from __future__ import annotations

import socket

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from proxy.core.upstreamauth import resolved_allowed

log = structlog.get_logger("ocicache.resolver")


class GuardedResolver(AbstractResolver):
    """Resolves names, but never into private address space for a name we were not configured
    with (see :func:`auth.resolved_allowed`). IP literals skip resolvers; :func:`auth.redirect_allowed`
    covers those."""

    def __init__(self, trusted_hosts: frozenset[str]) -> None:
        self._inner = DefaultResolver()
        self._trusted = trusted_hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        allowed = set(resolved_allowed(host, [i["host"] for i in infos], self._trusted))
        kept = [i for i in infos if i["host"] in allowed]
        if not kept:
            log.warning("resolution_refused", host=host)
            raise OSError(f"{host} resolves only to addresses this proxy does not dial")
        return kept

    async def close(self) -> None:
        await self._inner.close()
