"""Which repositories are known to hold which blobs, so that a blob cached through one
repository is served for another only after upstream confirms that one holds it too.

Content addressing makes a digest look like a capability, but it is not: a private layer's
digest is visible in public manifests that build on it, and zot's shared dedupe cache served
such layers to anyone who asked (CVE-2024-39897). Confirmations are kept on disk, so that an
offline cache still serves every repository it has served before.
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog
from cachetools import LRUCache

from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient

log = structlog.get_logger("ocicache.access")

_MEMORY: Final = 100_000


def holder_key(upstream: str, repository: str, digest: Digest) -> str:
    return f"holder {upstream} {repository} {digest}"


class Access:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._known: LRUCache[str, bool] = LRUCache(maxsize=_MEMORY)

    async def remember(self, upstream: str, repository: str, digest: Digest) -> None:
        """Note that upstream confirmed ``repository`` holds ``digest``. Known in memory only
        once it is on disk too: a confirmation lost to a full disk is asked for again, rather
        than silently missing after a restart (offline, that would refuse a pull)."""
        key = holder_key(upstream, repository, digest)
        if key in self._known:
            return
        try:
            await asyncio.to_thread(self.storage.write_record, key, {"holds": True})
        except OSError as exc:
            log.warning("access_not_stored", upstream=upstream, repository=repository, error=str(exc))
            return
        self._known[key] = True

    async def check(
        self, client: UpstreamClient, repository: str, digest: Digest, *, manifest: bool = False
    ) -> None:
        """Return if ``repository`` on ``client`` may be given ``digest``; else *_UNKNOWN."""
        key = holder_key(client.name, repository, digest)
        if key in self._known:
            return
        if await asyncio.to_thread(self.storage.read_record, key) is not None:
            self._known[key] = True
            return
        if manifest:
            held = await client.manifest_exists(repository, digest)
        else:
            held = await client.blob_exists(repository, digest)
        if not held:
            code = Code.MANIFEST_UNKNOWN if manifest else Code.BLOB_UNKNOWN
            raise OciError(code, "unknown to this repository", {"digest": str(digest)})
        await self.remember(client.name, repository, digest)
