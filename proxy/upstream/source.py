"""Where a fill's bytes come from: an upstream registry, or a peer replica that answers the same
way (an OCI blob GET with Range)."""

from __future__ import annotations

from typing import Protocol

from proxy.core.reference import Digest
from proxy.upstream.client import BlobStream


class BlobSource(Protocol):
    @property
    def name(self) -> str: ...

    async def open_blob(
        self, repository: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> BlobStream: ...
