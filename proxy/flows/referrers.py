"""Referrers: what ``GET /v2/<name>/referrers/<digest>`` answers (OCI 1.1), over upstream's
referrers API, its fallback tag, and the referrers the cache holds.

The answer is always an image index, empty when nothing refers to the subject, never a 404.

* Where upstream has the API, its answer (every page, up to ``referrers_max`` descriptors) is
  stored per subject and trusted for ``referrers_ttl``, like a tag; when upstream then fails
  (unreachable, 5xx, 429) the stored answer is served stale.
* Where it answers 404 or 405 (also after a redirect), it has no API: the answer is the index
  under the fallback tag ``sha256-<hex>``, fetched as a tag through :class:`ManifestStore` (so
  kept, revalidated and served stale like one), or empty when there is no such tag. Which kind
  an upstream is, is remembered for ``referrers_api_ttl``, so one without the API is not asked
  for it on every request; "no API" is learnt only from a subject upstream confirmed the
  repository holds (a 404 may also mean a repository it does not have).
* Offline, the answer is every referrer the cache holds for that repository: those upstream
  last listed, those in a fallback tag it holds, and every manifest it holds whose ``subject``
  is the digest (fetched, prefetched or imported). Only what the cache can serve is listed.

An upstream's answer stays faithful to upstream: a signature upstream no longer lists is not
added back from the cache while upstream is reachable. ``artifactType`` is always filtered here
(upstream's own filter, if any, is kept only when the stored answer was cut short), so the
answer says ``OCI-Filters-Applied: artifactType`` whenever a filter was asked for. Nothing
follows referrers of referrers: each answer lists one subject's direct referrers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from proxy.core.config import Settings
from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import OCI_INDEX
from proxy.core.reference import Digest
from proxy.core.referrers import Descriptor, NotAnIndex, fallback_tag, merged, of_manifest, only, parse_index
from proxy.flows.manifests import ManifestStore, Source, choose_answer
from proxy.store.catalogue import Catalogue, ReferrersAnswer, ReferrersKey
from proxy.upstream.client import UpstreamClient

log = structlog.get_logger("ocicache.referrers")

_SERVE_STALE_ON: Final = frozenset({Code.UNAVAILABLE, Code.UPSTREAM_ERROR, Code.TOOMANYREQUESTS})


@dataclass(frozen=True, slots=True)
class ReferrersServed:
    descriptors: tuple[Descriptor, ...]
    filtered: bool  # an artifactType filter was applied
    source: Source


class Referrers:
    def __init__(self, catalogue: Catalogue, manifests: ManifestStore, settings: Settings) -> None:
        self.catalogue = catalogue
        self.manifests = manifests
        self.settings = settings
        # upstream name -> (it has the referrers API, until when we believe so); one entry per
        # configured upstream at most.
        self._api: dict[str, tuple[bool, float]] = {}

    def has_api(self, upstream: str) -> bool | None:
        """What we remember of ``upstream``: True, False, or None (not known, or too old)."""
        known = self._api.get(upstream)
        if known is None or time.monotonic() >= known[1]:
            return None
        return known[0]

    def _remember(self, upstream: str, api: bool) -> None:
        if self.has_api(upstream) is not api:
            log.info("upstream_referrers_api", upstream=upstream, api=api)
        self._api[upstream] = (api, time.monotonic() + self.settings.referrers_api_ttl)

    async def get(
        self, upstream: UpstreamClient, repository: str, subject: Digest, artifact_type: str | None
    ) -> ReferrersServed:
        def served(descriptors: Sequence[Descriptor], source: Source) -> ReferrersServed:
            return ReferrersServed(tuple(only(descriptors, artifact_type)), artifact_type is not None, source)

        if upstream.offline:
            return served(await self.held(upstream, repository, subject), "offline")
        key: ReferrersKey = (upstream.name, repository, str(subject))
        stored = await self.catalogue.referrers_answer(key)
        ttl = self.settings.referrers_ttl
        if stored is None or (ttl is not None and time.time() - stored.fetched >= ttl):
            try:
                answer, source = await self.fetch(upstream, repository, subject)
            except OciError as err:
                return served(await self._instead(err, upstream, repository, subject, stored), "stale")
            if source != "stale":
                await self.catalogue.put_referrers_answer(key, answer)
        else:
            answer, source = stored, "hit"
        if artifact_type is not None and answer.truncated and answer.api:
            # Some were left out for the bound, and the ones asked for may be among them:
            # upstream can filter before it counts (and what it sends is filtered here again).
            try:
                reply = await upstream.referrers(
                    repository, subject, artifact_type, self.settings.referrers_max
                )
            except OciError as err:
                if err.code not in _SERVE_STALE_ON:
                    raise
            else:
                if reply is not None:
                    return served(reply.descriptors, "miss")
        return served(answer.descriptors, source)

    async def _instead(
        self,
        err: OciError,
        upstream: UpstreamClient,
        repository: str,
        subject: Digest,
        stored: ReferrersAnswer | None,
    ) -> Sequence[Descriptor]:
        """What to serve when upstream failed: the stored answer, whatever its age, else the
        referrers held; re-raises when upstream's word is final or nothing is there."""
        if err.code not in _SERVE_STALE_ON:
            raise err
        instead = stored.descriptors if stored is not None else await self.held(upstream, repository, subject)
        if stored is None and not instead:
            # An empty index would claim there is nothing; upstream's failure is the answer.
            raise err
        log.warning(
            "referrers_served_stale",
            upstream=upstream.name,
            repository=repository,
            subject=str(subject),
            reason=err.code.value,
        )
        return instead

    async def fetch(
        self, upstream: UpstreamClient, repository: str, subject: Digest
    ) -> tuple[ReferrersAnswer, Source]:
        """Upstream's unfiltered referrers of ``subject``: its API's, else its fallback tag's."""
        limit = self.settings.referrers_max
        if self.has_api(upstream.name) is not False:
            reply = await upstream.referrers(repository, subject, None, limit)
            if reply is not None:
                self._remember(upstream.name, True)
                return ReferrersAnswer(reply.descriptors, time.time(), True, reply.truncated), "miss"
            # A registry with the API may still answer 404 for a repository or a subject it
            # does not have: only a 404 for a subject upstream confirmed this repository holds
            # says the API is missing, or one client's typo would turn it off for everyone.
            if await self.catalogue.holds(upstream.name, repository, str(subject)):
                self._remember(upstream.name, False)
        tag = fallback_tag(subject)
        try:
            tagged = await self.manifests.get(upstream, repository, tag, [OCI_INDEX])
        except OciError as err:
            if err.code is not Code.MANIFEST_UNKNOWN:
                raise
            # No fallback tag (or none that is an index): nothing refers to the subject.
            return ReferrersAnswer((), time.time(), False, False), "miss"
        descriptors = self._fallback_entries(tagged.body, upstream, repository, tag)
        kept, truncated = merged([descriptors], limit)
        source: Source = "stale" if tagged.source == "stale" else "miss"
        return ReferrersAnswer(tuple(kept), time.time(), False, truncated), source

    @staticmethod
    def _fallback_entries(
        body: bytes, upstream: UpstreamClient, repository: str, tag: str
    ) -> list[Descriptor]:
        try:
            descriptors, dropped = parse_index(body)
        except NotAnIndex as exc:
            # The spec: a fallback tag that is not a valid index means no referrers.
            log.warning(
                "fallback_tag_not_an_index",
                upstream=upstream.name,
                repository=repository,
                tag=tag,
                reason=str(exc),
            )
            return []
        if dropped:
            log.warning(
                "fallback_tag_entries_dropped", upstream=upstream.name, repository=repository, dropped=dropped
            )
        return descriptors

    async def held(self, upstream: UpstreamClient, repository: str, subject: Digest) -> list[Descriptor]:
        """Every referrer of ``subject`` the cache can serve to ``repository`` without asking
        upstream: those upstream last listed, those of a fallback tag held, and the manifests
        held whose subject it is; each once, at most ``referrers_max``. Asks upstream nothing."""
        key: ReferrersKey = (upstream.name, repository, str(subject))
        stored = await self.catalogue.referrers_answer(key)
        listed = list(stored.descriptors) if stored is not None else []
        tag = fallback_tag(subject)
        answer = choose_answer(
            self.catalogue.answers((upstream.name, repository, tag)), frozenset({OCI_INDEX})
        )
        if answer is not None:
            loaded = await self.manifests.load(Digest.parse(answer.digest))
            if loaded is not None:
                listed += self._fallback_entries(loaded[0], upstream, repository, tag)
        limit = self.settings.referrers_max
        seen: set[str] = set()
        result: list[Descriptor] = []
        for d in listed:
            if len(result) >= limit:
                return result
            if d.digest not in seen:
                seen.add(d.digest)
                if await self._servable(upstream, repository, d.digest):
                    result.append(d)
        digests = self.catalogue.referrers_of.get(str(subject), set())
        # Oldest first, as registries list them; the digest breaks ties deterministically.
        for digest in sorted(digests, key=lambda d: (e.added if (e := self.catalogue.entry(d)) else 0.0, d)):
            if len(result) >= limit:
                break
            if digest in seen or not await self._servable(upstream, repository, digest):
                continue
            seen.add(digest)
            info = self.manifests.held(Digest.parse(digest))
            loaded = await self.manifests.load(Digest.parse(digest))
            if info is None or loaded is None:
                continue
            descriptor = of_manifest(loaded[0], digest, info.media_type, info.artifact_type)
            if descriptor is not None:
                result.append(descriptor)
        return result

    async def _servable(self, upstream: UpstreamClient, repository: str, digest: str) -> bool:
        """Held as a manifest, and confirmed for this repository (what an offline pull needs)."""
        if self.manifests.held(Digest.parse(digest)) is None:
            return False
        return await self.catalogue.holds(upstream.name, repository, digest)
