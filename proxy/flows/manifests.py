"""Manifests: stored as content-addressed blobs, with tag -> digest records that have an age.

A record remembers, per upstream, repository and tag, one digest for each media type it was
served as (a client that does not accept an index gets a different manifest for the same tag).
A record younger than the tag TTL is answered without asking upstream; an older one is
revalidated with a HEAD (which Docker Hub does not count against its pull limit), and served
stale when upstream is unreachable or rate limited. Digest-addressed manifests never change, so
they are served from disk whenever we have them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from cachetools import LRUCache

from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.flows.access import Access
from proxy.store.cache import BlobCache
from proxy.store.storage import Storage
from proxy.upstream.client import MANIFEST_TYPES, ManifestReply, UpstreamClient

log = structlog.get_logger("ocicache.manifests")

DEFAULT_ACCEPT: Final = ", ".join(MANIFEST_TYPES)
# Recently served manifests kept in memory; manifests are small and read on every pull.
BODIES_MEMORY: Final = 64 * 1024 * 1024
# What we fall back to when stale content may be served instead of an upstream failure.
_SERVE_STALE_ON: Final = frozenset({Code.UNAVAILABLE, Code.UPSTREAM_ERROR, Code.TOOMANYREQUESTS})

Source = Literal["hit", "miss", "stale", "revalidated"]


@dataclass(frozen=True, slots=True)
class Served:
    body: bytes
    media_type: str
    digest: Digest
    size: int
    source: Source


def accepted_types(accept_headers: list[str]) -> list[str] | None:
    """Media types a client accepts, or None for anything (no header, or ``*/*``)."""
    types = [
        part.split(";")[0].strip() for header in accept_headers for part in header.split(",") if part.strip()
    ]
    if not types or "*/*" in types:
        return None
    return types


def upstream_accept(accept_headers: list[str]) -> str:
    """What we ask upstream for: the client's media types, or every manifest type when it named
    none (``*/*`` alone, which HTTP libraries send by default, names none). Registries answer a
    request without their types with a schema 1 conversion or a 404."""
    types = accepted_types(accept_headers)
    return ", ".join(types) if types else DEFAULT_ACCEPT


def media_type_of(body: bytes) -> str:
    try:
        value = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        return "application/json"
    # Docker schema 1 and media-type-less OCI manifests: the OCI type is the spec's default.
    return value if isinstance(value, str) else "application/vnd.oci.image.manifest.v1+json"


def verify_body(body: bytes, digest: Digest) -> bool:
    return hashlib.new(digest.algorithm, body).hexdigest() == digest.hex


class ManifestStore:
    def __init__(self, storage: Storage, cache: BlobCache, access: Access, tag_ttl: float) -> None:
        self.storage = storage
        self.cache = cache
        self.access = access
        self.tag_ttl = tag_ttl
        # Mirrors of the on-disk records and of recently served manifests (with their media
        # type), so that a warm tag or digest costs no thread hop and no file read.
        self._records: LRUCache[str, dict[str, Any]] = LRUCache(maxsize=20000)
        self._bodies: LRUCache[Digest, tuple[bytes, str]] = LRUCache(
            maxsize=BODIES_MEMORY, getsizeof=lambda entry: len(entry[0])
        )

    # --- records -----------------------------------------------------------------------------

    async def _record(self, key: str) -> dict[str, Any] | None:
        rec = self._records.get(key)
        if rec is None:
            rec = await asyncio.to_thread(self.storage.read_record, key)
            if rec is not None:
                self._records[key] = rec
        return rec

    async def _save(self, key: str, rec: dict[str, Any]) -> None:
        self._records[key] = rec
        await asyncio.to_thread(self.storage.write_record, key, rec)

    async def _stored(self, digest: Digest) -> tuple[bytes, str] | None:
        # The cache index decides: a manifest evicted from disk is not served from memory.
        if digest not in self.cache:
            return None
        self.cache.touch(digest)
        remembered = self._bodies.get(digest)
        if remembered is not None:
            return remembered
        body = await asyncio.to_thread(self.storage.read_bytes, digest)
        if body is None:
            self.cache.forget(digest)
            return None
        meta = await self._record(f"manifest {digest}")
        media_type = meta.get("media_type") if meta else None
        stored = (body, media_type if isinstance(media_type, str) else media_type_of(body))
        self._bodies[digest] = stored
        return stored

    async def _keep(
        self, upstream: UpstreamClient, repository: str, reply: ManifestReply, digest: Digest
    ) -> None:
        await self.access.remember(upstream.name, repository, digest)
        if digest not in self.cache:
            await asyncio.to_thread(self.storage.put_bytes, digest, reply.body)
            self.cache.add(digest, len(reply.body))
        await self._save(f"manifest {digest}", {"media_type": reply.media_type or media_type_of(reply.body)})

    # --- lookups -----------------------------------------------------------------------------

    async def get(
        self,
        upstream: UpstreamClient,
        repository: str,
        reference: Digest | str,
        accept_headers: list[str],
    ) -> Served:
        if isinstance(reference, Digest):
            return await self._by_digest(upstream, repository, reference, accept_headers)
        return await self._by_tag(upstream, repository, reference, accept_headers)

    async def _by_digest(
        self,
        upstream: UpstreamClient,
        repository: str,
        digest: Digest,
        accept_headers: list[str],
    ) -> Served:
        stored = await self._stored(digest)
        if stored is not None:
            # Stored through some repository; this one may see it once upstream says it holds it.
            await self.access.check(upstream, repository, digest, manifest=True)
            body, media_type = stored
            return Served(body, media_type, digest, len(body), "hit")
        accept = upstream_accept(accept_headers)
        reply = await upstream.manifest("GET", repository, str(digest), accept)
        if not verify_body(reply.body, digest):
            log.error(
                "manifest_digest_mismatch", upstream=upstream.name, repository=repository, digest=str(digest)
            )
            raise OciError(Code.UPSTREAM_ERROR, "upstream manifest does not match its digest")
        await self._keep(upstream, repository, reply, digest)
        return Served(reply.body, reply.media_type, digest, reply.size, "miss")

    async def _by_tag(
        self,
        upstream: UpstreamClient,
        repository: str,
        tag: str,
        accept_headers: list[str],
    ) -> Served:
        key = f"tag {upstream.name} {repository} {tag}"
        rec = await self._record(key) or {"types": {}}
        candidate = _pick(rec, accepted_types(accept_headers))
        known = Digest.parse(candidate["digest"]) if candidate else None
        stored = await self._stored(known) if known else None

        def ours(source: Source) -> Served:
            assert known is not None and stored is not None
            return Served(stored[0], stored[1], known, len(stored[0]), source)

        if candidate and stored and time.time() - float(candidate["fetched"]) < self.tag_ttl:
            return ours("hit")

        accept = upstream_accept(accept_headers)
        try:
            if candidate and stored:
                # Revalidate what we have with a HEAD before paying for a GET.
                probe = await upstream.manifest("HEAD", repository, tag, accept)
                if probe.digest is not None and probe.digest == candidate["digest"]:
                    candidate["fetched"] = time.time()
                    await self._save(key, rec)
                    return ours("revalidated")
            reply = await upstream.manifest("GET", repository, tag, accept)
        except OciError as err:
            if candidate and stored and err.code in _SERVE_STALE_ON:
                log.warning(
                    "manifest_served_stale",
                    upstream=upstream.name,
                    repository=repository,
                    tag=tag,
                    reason=err.code.value,
                )
                return ours("stale")
            raise
        digest = _digest_of(reply)
        await self._keep(upstream, repository, reply, digest)
        media_type = reply.media_type or media_type_of(reply.body)
        rec["types"][media_type] = {"digest": str(digest), "fetched": time.time()}
        await self._save(key, rec)
        return Served(reply.body, media_type, digest, reply.size, "miss")


def _pick(rec: dict[str, Any], wanted: list[str] | None) -> dict[str, Any] | None:
    """The freshest entry the client accepts."""
    entries = [
        entry for media_type, entry in rec.get("types", {}).items() if wanted is None or media_type in wanted
    ]
    return max(entries, key=lambda e: float(e["fetched"]), default=None)


def _digest_of(reply: ManifestReply) -> Digest:
    """The digest of a manifest fetched by tag: upstream's header, checked against the bytes."""
    if reply.digest:
        try:
            claimed = Digest.parse(reply.digest)
        except OciError:
            claimed = None
        if claimed is not None:
            if not verify_body(reply.body, claimed):
                raise OciError(Code.UPSTREAM_ERROR, "upstream manifest does not match its digest")
            return claimed
    return Digest("sha256", hashlib.sha256(reply.body).hexdigest())
