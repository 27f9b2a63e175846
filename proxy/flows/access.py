"""Which repositories are known to hold which blobs, so that a blob cached through one
repository is served for another only after upstream confirms that one holds it too.

Content addressing makes a digest look like a capability, but it is not: a private layer's
digest is visible in public manifests that build on it, and zot's shared dedupe cache served
such layers to anyone who asked (CVE-2024-39897). Confirmations are kept in the catalogue, so
that an offline cache still serves every repository it has served before; an offline proxy
that cannot ask upstream treats an unconfirmed repository as not holding the digest.
"""

from __future__ import annotations

from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.store.catalogue import Catalogue
from proxy.upstream.client import UpstreamClient


class Access:
    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    async def remember(self, upstream: str, repository: str, digest: Digest) -> None:
        """Note that upstream confirmed ``repository`` holds ``digest``."""
        await self.catalogue.add_holder(upstream, repository, str(digest))

    def known(self, client: UpstreamClient, repository: str, digest: Digest) -> bool:
        """Confirmed, by memory alone (the warm path asks nothing else)."""
        return self.catalogue.holds_in_memory(client.name, repository, str(digest))

    async def check(
        self, client: UpstreamClient, repository: str, digest: Digest, *, manifest: bool = False
    ) -> None:
        """Return if ``repository`` on ``client`` may be given ``digest``; else *_UNKNOWN."""
        if await self.catalogue.holds(client.name, repository, str(digest)):
            return
        code = Code.MANIFEST_UNKNOWN if manifest else Code.BLOB_UNKNOWN
        if client.offline:
            raise OciError(
                code,
                "unknown to this repository, and the proxy is offline",
                {"digest": str(digest), "offline": True},
            )
        if manifest:
            held = await client.manifest_exists(repository, digest)
        else:
            held = await client.blob_exists(repository, digest)
        if not held:
            raise OciError(code, "unknown to this repository", {"digest": str(digest)})
        await self.remember(client.name, repository, digest)
