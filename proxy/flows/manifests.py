"""Manifests: stored as content-addressed files, with tag records that have an age.

A registry negotiates a tag's answer by the client's ``Accept`` (see
:mod:`proxy.core.mediatypes`), so a tag record keeps one answer per set of accepted types,
keyed by :func:`accept_key`: a client gets what upstream gave for the set it sent, never what
a client with a narrower ``Accept`` was given (a Docker v2-only request must not turn a
multi-platform tag into its amd64 manifest for everyone). An index or list answer also serves
any other set that accepts its type, since it is the stored manifest itself.

An answer younger than the tag TTL is served without asking upstream; an older one is
revalidated with a HEAD (which Docker Hub does not count against its pull limit), and served
stale when upstream is unreachable or rate limited. Digest-addressed manifests never change, so
they are served from disk whenever we hold them, after the access check.

What upstream sends must be a manifest: its type is read from its own bytes, and a body that
is not one (a captive portal's HTML page) is a 502, never stored. Storing a verified manifest
can fail (a full disk); the client is served all the same, and the failure is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from cachetools import LRUCache

from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import (
    DOCKER_SCHEMA1_SIGNED,
    NotAManifest,
    accept_key,
    accepted_types,
    accepts,
    is_index,
    manifest_type,
    upstream_accept,
)
from proxy.core.reference import Digest
from proxy.flows.access import Access
from proxy.store.cache import BlobCache
from proxy.store.storage import Storage
from proxy.upstream.client import MANIFEST_MAX, ManifestReply, UpstreamClient

log = structlog.get_logger("ocicache.manifests")

# Recently served manifests kept in memory; manifests are small and read on every pull.
BODIES_MEMORY: Final = 64 * 1024 * 1024
# Answers kept per tag: one per Accept set clients really send (a handful); a client cycling
# through odd Accept headers only pushes out the oldest.
ANSWERS_PER_TAG: Final = 8
# What we fall back to when stale content may be served instead of an upstream failure.
_SERVE_STALE_ON: Final = frozenset({Code.UNAVAILABLE, Code.UPSTREAM_ERROR, Code.TOOMANYREQUESTS})

Source = Literal["hit", "miss", "stale", "revalidated"]
Answers = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Served:
    body: bytes
    media_type: str
    digest: Digest
    size: int
    source: Source


def verify_body(body: bytes, digest: Digest) -> bool:
    return hashlib.new(digest.algorithm, body).hexdigest() == digest.hex


def answers_of(rec: dict[str, Any] | None) -> Answers:
    """A tag record's answers by accept key, from either record format.

    Records written before answers were keyed by ``Accept`` hold ``types``: one entry per media
    type served. An index entry is the tag's stored manifest; a single manifest is filed under
    its own type and, when the record knows no index, under "anything" too (the tag is then most
    likely single-platform; a HEAD after the TTL corrects it if not).
    """
    if rec is None:
        return {}
    answers = rec.get("answers")
    if isinstance(answers, dict):
        return answers
    old = rec.get("types")
    if not isinstance(old, dict):
        return {}
    converted: Answers = {}
    has_index = any(is_index(t) for t in old)
    for media_type, entry in old.items():
        if not isinstance(entry, dict) or "digest" not in entry:
            continue
        answer = {"digest": entry["digest"], "media_type": media_type, "fetched": entry.get("fetched", 0)}
        converted[accept_key(frozenset({media_type}))] = answer
        if is_index(media_type) or not has_index:
            converted[accept_key(None)] = answer
    return converted


def choose_answer(answers: Answers, accepted: frozenset[str] | None) -> dict[str, Any] | None:
    """The answer for a client accepting ``accepted``: the one given for that very set, else
    the freshest index answer of a type it accepts. Never a single manifest given to another
    set: that one may be the result of negotiating an index away."""
    exact = answers.get(accept_key(accepted))
    if exact is not None:
        return exact
    indexes = [
        a
        for a in answers.values()
        if is_index(str(a.get("media_type"))) and accepts(accepted, a["media_type"])
    ]
    return max(indexes, key=lambda a: float(a["fetched"]), default=None)


def _bounded(answers: Answers) -> Answers:
    if len(answers) <= ANSWERS_PER_TAG:
        return answers
    newest = sorted(answers.items(), key=lambda kv: float(kv[1]["fetched"]), reverse=True)
    return dict(newest[:ANSWERS_PER_TAG])


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
        """Keep a record in memory and on disk; a disk failure is logged, not raised: the
        answer being served is good, and the next request tries again."""
        self._records[key] = rec
        try:
            await asyncio.to_thread(self.storage.write_record, key, rec)
        except OSError as exc:
            log.warning("record_not_stored", key=key.split(" ")[0], error=str(exc))

    # --- stored manifests --------------------------------------------------------------------

    async def _held(self, digest: Digest) -> str | None:
        """The media type of a manifest we hold as ``digest``, or None. Reads no body: a digest
        we hold only as a layer, or anything larger than a manifest may be, is not one."""
        if digest not in self.cache:
            return None
        remembered = self._bodies.get(digest)
        if remembered is not None:
            return remembered[1]
        size = self.cache.size_of(digest)
        if size is None or size > MANIFEST_MAX:
            return None
        meta = await self._record(f"manifest {digest}")
        media_type = meta.get("media_type") if meta else None
        return media_type if isinstance(media_type, str) else None

    async def _load(self, digest: Digest) -> tuple[bytes, str] | None:
        """The body and media type of a manifest we hold, checked against its digest."""
        media_type = await self._held(digest)
        if media_type is None:
            return None
        self.cache.touch(digest)
        remembered = self._bodies.get(digest)
        if remembered is not None:
            return remembered
        body = await asyncio.to_thread(self.storage.read_bytes, digest, MANIFEST_MAX)
        if body is None or not verify_body(body, digest):
            # Gone, or changed on disk behind our back: not ours to serve; fetch it again.
            log.warning("stored_manifest_unusable", digest=str(digest), missing=body is None)
            self.cache.forget(digest)
            await asyncio.to_thread(self.storage.remove, digest)
            return None
        stored = (body, media_type)
        self._bodies[digest] = stored
        return stored

    async def _keep(
        self, upstream: UpstreamClient, repository: str, body: bytes, digest: Digest, media_type: str
    ) -> None:
        await self.access.remember(upstream.name, repository, digest)
        try:
            if digest not in self.cache:
                await asyncio.to_thread(self.storage.put_bytes, digest, body)
                self.cache.add(digest, len(body))
        except OSError as exc:
            log.warning("manifest_not_stored", digest=str(digest), error=str(exc))
            return
        await self._save(f"manifest {digest}", {"media_type": media_type})
        self._bodies[digest] = (body, media_type)

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
        if await self._held(digest) is not None:
            # Stored through some repository; this one may see it once upstream says it holds
            # it. Checked before a byte is read.
            await self.access.check(upstream, repository, digest, manifest=True)
            stored = await self._load(digest)
            if stored is not None:
                body, media_type = stored
                return Served(body, media_type, digest, len(body), "hit")
        accept = upstream_accept(accepted_types(accept_headers))
        reply = await upstream.manifest("GET", repository, str(digest), accept)
        if not verify_body(reply.body, digest):
            log.error(
                "manifest_digest_mismatch", upstream=upstream.name, repository=repository, digest=str(digest)
            )
            raise OciError(Code.UPSTREAM_ERROR, "upstream manifest does not match its digest")
        # By digest a registry answers the bytes as they are, whatever the Accept: so do we.
        media_type = _type_of(reply, upstream, repository)
        await self._keep(upstream, repository, reply.body, digest, media_type)
        return Served(reply.body, media_type, digest, reply.size, "miss")

    async def _by_tag(
        self,
        upstream: UpstreamClient,
        repository: str,
        tag: str,
        accept_headers: list[str],
    ) -> Served:
        wanted = accepted_types(accept_headers)
        key = accept_key(wanted)
        rec_key = f"tag {upstream.name} {repository} {tag}"
        answers = answers_of(await self._record(rec_key))
        answer = choose_answer(answers, wanted)
        known = Digest.parse(answer["digest"]) if answer else None
        stored = await self._load(known) if known else None

        def ours(source: Source) -> Served:
            assert known is not None and stored is not None
            return Served(stored[0], stored[1], known, len(stored[0]), source)

        if answer and stored and time.time() - float(answer["fetched"]) < self.tag_ttl:
            return ours("hit")

        accept = upstream_accept(wanted)
        try:
            if answer and stored:
                # Revalidate what we have with a HEAD before paying for a GET.
                probe = await upstream.manifest("HEAD", repository, tag, accept)
                if probe.digest is not None and probe.digest == answer["digest"]:
                    answers[key] = {**answer, "fetched": time.time()}
                    await self._save(rec_key, {"answers": _bounded(answers)})
                    return ours("revalidated")
            reply = await upstream.manifest("GET", repository, tag, accept)
        except OciError as err:
            if answer and stored and err.code in _SERVE_STALE_ON:
                log.warning(
                    "manifest_served_stale",
                    upstream=upstream.name,
                    repository=repository,
                    tag=tag,
                    reason=err.code.value,
                )
                return ours("stale")
            raise
        media_type = _type_of(reply, upstream, repository)
        if not accepts(wanted, media_type):
            # Upstream ignored the Accept header. Answering a type the client did not ask for
            # would make it parse the wrong document; registries answer 404 here.
            raise OciError(
                Code.MANIFEST_UNKNOWN,
                "upstream has no manifest of a media type this client accepts",
                {"tag": tag, "media_type": media_type},
            )
        digest = _digest_of(reply, media_type)
        await self._keep(upstream, repository, reply.body, digest, media_type)
        answers[key] = {"digest": str(digest), "media_type": media_type, "fetched": time.time()}
        await self._save(rec_key, {"answers": _bounded(answers)})
        return Served(reply.body, media_type, digest, reply.size, "miss")


def _type_of(reply: ManifestReply, upstream: UpstreamClient, repository: str) -> str:
    """The manifest's media type from its own bytes; 502 when the body is not a manifest."""
    try:
        media_type = manifest_type(reply.body)
    except NotAManifest as exc:
        log.warning(
            "upstream_not_a_manifest",
            upstream=upstream.name,
            repository=repository,
            content_type=reply.media_type[:100],
            reason=str(exc),
        )
        raise OciError(
            Code.UPSTREAM_ERROR,
            "upstream answered with something that is not a manifest",
            {"upstream": upstream.name, "content_type": reply.media_type[:100]},
        ) from exc
    if reply.media_type and reply.media_type != media_type:
        log.info(
            "manifest_type_corrected",
            upstream=upstream.name,
            repository=repository,
            header=reply.media_type[:100],
            body=media_type,
        )
    return media_type


def _digest_of(reply: ManifestReply, media_type: str) -> Digest:
    """The digest of a manifest fetched by tag: upstream's header, checked against the bytes."""
    if reply.digest:
        try:
            claimed = Digest.parse(reply.digest)
        except OciError:
            claimed = None
        if claimed is not None:
            if not verify_body(reply.body, claimed):
                if media_type == DOCKER_SCHEMA1_SIGNED:
                    # Its digest covers the payload without the signatures, so the bytes we
                    # would store could never be checked against it. Docker retired it.
                    raise OciError(Code.UPSTREAM_ERROR, "signed schema 1 manifests are not supported")
                raise OciError(Code.UPSTREAM_ERROR, "upstream manifest does not match its digest")
            return claimed
    return Digest("sha256", hashlib.sha256(reply.body).hexdigest())
