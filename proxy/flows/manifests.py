"""Manifests: stored as content-addressed files, with tag answers that have an age.

A registry negotiates a tag's answer by the client's ``Accept`` (see
:mod:`proxy.core.mediatypes`), so a tag keeps one answer per set of accepted types, keyed by
:func:`accept_key`: a client gets what upstream gave for the set it sent, never what a client
with a narrower ``Accept`` was given (a Docker v2-only request must not turn a multi-platform
tag into its amd64 manifest for everyone). An index or list answer also serves any other set
that accepts its type, since it is the stored manifest itself.

An answer younger than its tag's TTL (``tag_rules``, the upstream's ``tag_ttl``, or the global
one; possibly forever) is served without asking upstream; an older one is revalidated with a
HEAD (which Docker Hub does not count against its pull limit), and served stale when upstream
is unreachable or rate limited, or when it says the tag is gone and the upstream is configured
to ``keep_deleted``. Offline, every answer is served whatever its age, and what is not cached
is unknown. Digest-addressed manifests never change, so they are served from disk whenever we
hold them, after the access check.

What upstream sends must be a manifest: its type is read from its own bytes, and a body that
is not one (a captive portal's HTML page) is a 502, never stored. Storing a verified manifest
can fail (a full disk); the client is served all the same, and the failure is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Final, Literal

import structlog
from cachetools import LRUCache

from proxy.cluster.cluster import Cluster
from proxy.core.config import Settings
from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import (
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    MANIFEST_MAX,
    NotAManifest,
    accept_key,
    accepted_types,
    accepts,
    describe,
    is_index,
    manifest_type,
    upstream_accept,
)
from proxy.core.reference import Digest
from proxy.flows.access import Access
from proxy.store.cache import BlobCache
from proxy.store.catalogue import Catalogue, ManifestInfo, TagAnswer, TagKey
from proxy.store.storage import Storage
from proxy.upstream.client import ManifestReply, UpstreamClient
from proxy.upstream.failures import MANIFEST

log = structlog.get_logger("ocicache.manifests")

# Recently served manifests kept in memory; manifests are small and read on every pull.
BODIES_MEMORY: Final = 64 * 1024 * 1024
# Warm tag answers kept ready to serve (their bodies are mostly those of BODIES_MEMORY too).
HOT_MEMORY: Final = 32 * 1024 * 1024
# Answers kept per tag: one per Accept set clients really send (a handful); a client cycling
# through odd Accept headers only pushes out the oldest.
ANSWERS_PER_TAG: Final = 8
# What we fall back to when stale content may be served instead of an upstream failure.
_SERVE_STALE_ON: Final = frozenset({Code.UNAVAILABLE, Code.UPSTREAM_ERROR, Code.TOOMANYREQUESTS})

Source = Literal["hit", "miss", "stale", "revalidated", "offline", "shared"]


@dataclass(frozen=True, slots=True)
class Served:
    body: bytes
    media_type: str
    digest: Digest
    size: int
    source: Source


def verify_body(body: bytes, digest: Digest) -> bool:
    return hashlib.new(digest.algorithm, body).hexdigest() == digest.hex


def choose_answer(answers: dict[str, TagAnswer], accepted: frozenset[str] | None) -> TagAnswer | None:
    """The answer for a client accepting ``accepted``: the one given for that very set, else
    the freshest answer that is the tag's stored manifest, if the client accepts its type.

    An answer is the stored manifest when it is an index (negotiation only ever goes from an
    index down), or when it was given to a set that accepts every index type (so upstream had
    no index to negotiate away). Never another single manifest: that one may be what a narrow
    client was given instead of the index."""
    exact = answers.get(accept_key(accepted))
    if exact is not None:
        return exact
    stored = [
        a
        for key, a in answers.items()
        if accepts(accepted, a.media_type) and (is_index(a.media_type) or INDEX_TYPES <= set(key.split(",")))
    ]
    return max(stored, key=lambda a: a.fetched, default=None)


def _bounded(answers: dict[str, TagAnswer]) -> dict[str, TagAnswer]:
    if len(answers) <= ANSWERS_PER_TAG:
        return answers
    newest = sorted(answers.items(), key=lambda kv: kv[1].fetched, reverse=True)
    return dict(newest[:ANSWERS_PER_TAG])


class ManifestStore:
    def __init__(
        self,
        storage: Storage,
        catalogue: Catalogue,
        cache: BlobCache,
        access: Access,
        settings: Settings,
        cluster: Cluster | None = None,
    ) -> None:
        self.cluster = cluster
        self.storage = storage
        self.catalogue = catalogue
        self.cache = cache
        self.access = access
        self.settings = settings
        # Recently served manifests, so that a warm tag or digest costs no thread hop and no
        # file read. The catalogue decides what is held: what it drops is dropped here too.
        self._bodies: LRUCache[str, bytes] = LRUCache(maxsize=BODIES_MEMORY, getsizeof=len)
        # (tag, accept key) -> (catalogue version, answer's fetch time, what was served): a hit
        # answered again while nothing in the catalogue changed costs two lookups.
        self._hot: LRUCache[tuple[TagKey, str], tuple[int, float, Served]] = LRUCache(
            maxsize=HOT_MEMORY, getsizeof=lambda entry: 200 + entry[2].size
        )
        catalogue.drop_observers.append(self._forget_body)

    def _forget_body(self, digest: str) -> None:
        self._bodies.pop(digest, None)

    # --- stored manifests --------------------------------------------------------------------

    def held(self, digest: Digest) -> ManifestInfo | None:
        """A manifest we hold as ``digest``, from memory alone. Reads no body: a digest we hold
        only as a layer, or anything larger than a manifest may be, is not one."""
        info = self.catalogue.manifests.get(str(digest))
        if info is None or info.size > MANIFEST_MAX:
            return None
        return info

    async def load(self, digest: Digest) -> tuple[bytes, str] | None:
        """The body and media type of a manifest we hold, checked against its digest."""
        info = self.held(digest)
        if info is None:
            return None
        key = str(digest)
        self.catalogue.touch(key)
        body = self._bodies.get(key)
        if body is not None:
            return body, info.media_type
        body = await asyncio.to_thread(self.storage.read_bytes, digest, MANIFEST_MAX)
        if body is None or not verify_body(body, digest):
            # Gone, or changed on disk behind our back: not ours to serve; fetch it again.
            log.warning("stored_manifest_unusable", digest=key, missing=body is None)
            await self.cache.remove(digest)
            return None
        self._bodies[key] = body
        return body, info.media_type

    async def keep(
        self,
        upstream: UpstreamClient,
        repository: str,
        body: bytes,
        digest: Digest,
        media_type: str,
        *,
        share: bool = True,
    ) -> None:
        """Store a verified manifest fetched through ``repository``: its rows first, then its
        file. A failure (a full disk) is logged; the caller serves the body all the same."""
        key = str(digest)
        if key not in self.catalogue.manifests:
            info = ManifestInfo.of(media_type, len(body), describe(body))
            if not await self.catalogue.persist_manifest(key, info):
                return
            try:
                if key not in self.catalogue.blobs:
                    await asyncio.to_thread(self.storage.put_bytes, digest, body)
            except OSError as exc:
                self.catalogue.forget_manifest_rows(key)
                log.warning("manifest_not_stored", digest=key, error=str(exc))
                return
            self.catalogue.index_manifest(key, info)
            self.cache.note_added()
        self._bodies[key] = body
        # ``share``: fetched from upstream just now (not another replica's copy).
        await self.access.remember(upstream.name, repository, digest, share=share)
        if share and self.cluster is not None:
            await self.cluster.records.put_manifest(key, body, media_type)

    # --- lookups -----------------------------------------------------------------------------

    def fresh_for(
        self, upstream: UpstreamClient, repository: str, reference: Digest | str, accept_headers: list[str]
    ) -> float:
        """Seconds the answer :meth:`get` would give now stays the one it gives without asking
        upstream (inf: a digest, offline, or a tag kept forever). What a front worker may reuse."""
        if isinstance(reference, Digest) or upstream.offline:
            return float("inf")
        answer = choose_answer(
            dict(self.catalogue.answers((upstream.name, repository, reference))),
            accepted_types(accept_headers),
        )
        if answer is None:
            return 0.0
        ttl = self.settings.ttl_for(upstream.cfg, reference)
        return float("inf") if ttl is None else answer.fetched + ttl - time.time()

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
        if self.held(digest) is not None:
            # Stored through some repository; this one may see it once upstream says it holds
            # it. Checked before a byte is read.
            await self.access.check(upstream, repository, digest, manifest=True)
            stored = await self.load(digest)
            if stored is not None:
                body, media_type = stored
                return Served(body, media_type, digest, len(body), "hit")
        if upstream.offline:
            raise _offline(Code.MANIFEST_UNKNOWN, {"digest": str(digest)})
        if self.cluster is not None:
            shared = await self._shared_body(digest)
            if shared is not None:
                # Another replica fetched it, maybe through another repository: this one's
                # access is checked as for a manifest we hold.
                await self.access.check(upstream, repository, digest, manifest=True)
                body, media_type = shared
                await self.keep(upstream, repository, body, digest, media_type, share=False)
                return Served(body, media_type, digest, len(body), "shared")
        accept = upstream_accept(accepted_types(accept_headers))
        reply = await upstream.manifest("GET", repository, str(digest), accept)
        if not verify_body(reply.body, digest):
            log.error(
                "manifest_digest_mismatch", upstream=upstream.name, repository=repository, digest=str(digest)
            )
            raise upstream.bad_answer(MANIFEST, "upstream manifest does not match its digest")
        # By digest a registry answers the bytes as they are, whatever the Accept: so do we.
        media_type = _type_of(reply, upstream, repository)
        await self.keep(upstream, repository, reply.body, digest, media_type)
        return Served(reply.body, media_type, digest, reply.size, "miss")

    async def _by_tag(
        self,
        upstream: UpstreamClient,
        repository: str,
        tag: str,
        accept_headers: list[str],
    ) -> Served:
        wanted = accepted_types(accept_headers)
        key: TagKey = (upstream.name, repository, tag)
        hot_key = (key, accept_key(wanted))
        hot = self._hot.get(hot_key)
        if hot is not None and hot[0] == self.catalogue.version:
            # The warm path: nothing changed since this very answer was served.
            _, fetched, served = hot
            ttl = self.settings.ttl_for(upstream.cfg, tag)
            if ttl is None or time.time() - fetched < ttl:
                self.catalogue.touch(str(served.digest))
                return served
        answers = dict(self.catalogue.answers(key))
        answer = choose_answer(answers, wanted)
        known = Digest.parse(answer.digest) if answer else None
        stored = await self.load(known) if known else None

        def ours(source: Source) -> Served:
            assert known is not None and stored is not None
            return Served(stored[0], stored[1], known, len(stored[0]), source)

        if answer and stored:
            ttl = self.settings.ttl_for(upstream.cfg, tag)
            if ttl is None or time.time() - answer.fetched < ttl:
                served = ours("hit")
                self._hot[hot_key] = (self.catalogue.version, answer.fetched, served)
                return served
            if upstream.offline:
                return ours("offline")
        if upstream.offline:
            raise _offline(Code.MANIFEST_UNKNOWN, {"tag": tag})
        cluster = self.cluster
        if cluster is not None:
            shared = await self._shared_tag(upstream, key, answers, wanted)
            if shared is not None:
                return shared
            if not (answer and stored) and await cluster.records.absent(upstream.name, repository, tag):
                raise OciError(Code.MANIFEST_UNKNOWN, "not found upstream", {"tag": tag, "recently": True})

        accept = upstream_accept(wanted)
        try:
            if answer and stored:
                # Revalidate what we have with a HEAD before paying for a GET.
                probe = await upstream.manifest("HEAD", repository, tag, accept)
                if probe.digest is not None and probe.digest == answer.digest:
                    answers[accept_key(wanted)] = TagAnswer(answer.digest, answer.media_type, time.time())
                    await self.catalogue.put_answers(key, _bounded(answers))
                    await self._share_answers(key, answers)
                    return ours("revalidated")
            reply = await upstream.manifest("GET", repository, tag, accept)
        except OciError as err:
            if cluster is not None and err.code is Code.MANIFEST_UNKNOWN:
                await cluster.records.put_absent(upstream.name, repository, tag)
            if answer and stored and err.code in _SERVE_STALE_ON:
                log.warning(
                    "manifest_served_stale",
                    upstream=upstream.name,
                    repository=repository,
                    tag=tag,
                    reason=err.code.value,
                )
                return ours("stale")
            if answer and stored and err.code is Code.MANIFEST_UNKNOWN and upstream.cfg.keep_deleted:
                log.warning(
                    "tag_deleted_upstream_kept", upstream=upstream.name, repository=repository, tag=tag
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
        await self.keep(upstream, repository, reply.body, digest, media_type)
        if self.held(digest) is not None:
            # Only an answer we can serve again is kept (a manifest we could not store is not).
            answers[accept_key(wanted)] = TagAnswer(str(digest), media_type, time.time())
            await self.catalogue.put_answers(key, _bounded(answers))
            await self._share_answers(key, answers)
        return Served(reply.body, media_type, digest, reply.size, "miss")

    # --- shared with the other replicas ------------------------------------------------------

    async def _share_answers(self, key: TagKey, answers: dict[str, TagAnswer]) -> None:
        if self.cluster is not None:
            await self.cluster.records.put_answers(*key, _bounded(answers))

    async def _shared_body(self, digest: Digest) -> tuple[bytes, str] | None:
        """A manifest another replica stored in Redis: its bytes checked against the digest, its
        type read from them (a record is a hint, never trusted as it is)."""
        assert self.cluster is not None
        found = await self.cluster.records.manifest(str(digest))
        if found is None or not verify_body(found[0], digest):
            return None
        try:
            return found[0], manifest_type(found[0])
        except NotAManifest:
            return None

    async def _shared_tag(
        self,
        upstream: UpstreamClient,
        key: TagKey,
        answers: dict[str, TagAnswer],
        wanted: frozenset[str] | None,
    ) -> Served | None:
        """A fresh answer another replica got for this tag, served as ours (and kept)."""
        assert self.cluster is not None
        remote = await self.cluster.records.answers(*key)
        if not remote:
            return None
        merged = dict(answers)
        for accept, theirs in remote.items():
            if accept not in merged or merged[accept].fetched < theirs.fetched:
                merged[accept] = theirs
        chosen = choose_answer(merged, wanted)
        ttl = self.settings.ttl_for(upstream.cfg, key[2])
        if chosen is None or (ttl is not None and time.time() - chosen.fetched >= ttl):
            return None
        try:
            digest = Digest.parse(chosen.digest)
        except OciError:
            return None
        stored = await self.load(digest)
        if stored is None:
            stored = await self._shared_body(digest)
            if stored is None:
                return None
            await self.keep(upstream, key[1], stored[0], digest, stored[1], share=False)
        body, media_type = stored
        if not accepts(wanted, media_type):
            return None
        if self.held(digest) is not None:
            await self.catalogue.put_answers(key, _bounded(merged))
        return Served(body, media_type, digest, len(body), "shared")


def _offline(code: Code, detail: dict[str, object]) -> OciError:
    return OciError(code, "not cached, and the proxy is offline", {**detail, "offline": True})


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
        err = upstream.bad_answer(MANIFEST, "upstream answered with something that is not a manifest")
        err.detail = {"upstream": upstream.name, "content_type": reply.media_type[:100]}
        raise err from exc
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
