"""Which repositories are known to hold which blobs, so that a blob cached through one
repository is served for another only after upstream confirms that one holds it too.

Content addressing makes a digest look like a capability, but it is not: a private layer's
digest is visible in public manifests that build on it, and zot's shared dedupe cache served
such layers to anyone who asked (CVE-2024-39897). Confirmations are kept in the catalogue, so
that an offline cache still serves every repository it has served before; an offline proxy
that cannot ask upstream treats an unconfirmed repository as not holding the digest.

Replicas share confirmations per repository (:mod:`proxy.cluster.holders`): one replica's
answer from upstream spares the others the question, and a drop is never undone by a stale
confirmation or another repository's lookup.
"""

from __future__ import annotations

from proxy.cluster.cluster import Cluster
from proxy.cluster.holders import Fact, now_ms
from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.store.catalogue import Catalogue
from proxy.upstream.client import UpstreamClient


class Access:
    def __init__(self, catalogue: Catalogue, cluster: Cluster | None = None) -> None:
        self.catalogue = catalogue
        self.cluster = cluster

    async def remember(
        self,
        upstream: str,
        repository: str,
        digest: Digest,
        *,
        share: bool = True,
        asked_ms: int | None = None,
    ) -> None:
        """Note that upstream confirmed ``repository`` holds ``digest``. In a cluster, also tell
        the other replicas, when ``share``: only a fresh answer from upstream (asked at
        ``asked_ms``) is shared, never what a replica merely remembers or heard from a peer."""
        await self.catalogue.add_holder(upstream, repository, str(digest))
        if share and self.cluster is not None:
            await self.cluster.holders.confirm(upstream, repository, str(digest), asked_ms or now_ms())

    async def forget(self, upstream: str, repository: str, digest: Digest, asked_ms: int) -> None:
        """Upstream said (asked at ``asked_ms``) that ``repository`` does not hold ``digest``:
        the shared confirmation is dropped for good (a tombstone; see proxy.cluster.holders)."""
        if self.cluster is not None:
            await self.cluster.holders.drop(upstream, repository, str(digest), asked_ms)

    def known(self, client: UpstreamClient, repository: str, digest: Digest) -> bool:
        """Confirmed, by memory alone (the warm path asks nothing else)."""
        return self.catalogue.holds_in_memory(client.name, repository, str(digest))

    async def check(
        self, client: UpstreamClient, repository: str, digest: Digest, *, manifest: bool = False
    ) -> None:
        """Return if ``repository`` on ``client`` may be given ``digest``; else *_UNKNOWN."""
        if await self.catalogue.holds(client.name, repository, str(digest)):
            return
        if self.cluster is not None:
            fact = await self.cluster.holders.fact(client.name, repository, str(digest))
            if fact is Fact.CONFIRMED:
                # Another replica asked upstream: ours too now (not shared again: it is theirs).
                await self.catalogue.add_holder(client.name, repository, str(digest))
                return
        code = Code.MANIFEST_UNKNOWN if manifest else Code.BLOB_UNKNOWN
        if client.offline:
            raise OciError(
                code,
                "unknown to this repository, and the proxy is offline",
                {"digest": str(digest), "offline": True},
            )
        asked = now_ms()
        if manifest:
            held = await client.manifest_exists(repository, digest)
        else:
            held = await client.blob_exists(repository, digest)
        if not held:
            await self.forget(client.name, repository, digest, asked)
            raise OciError(code, "unknown to this repository", {"digest": str(digest)})
        await self.remember(client.name, repository, digest, asked_ms=asked)
