"""Prefetch: put images into the cache as a pull would, without a client.

For each reference: its manifest by tag (answered for every media type, so that clients of
every kind are served from it offline) or by digest, through the :class:`ManifestStore` (fetched,
verified, typed from its own bytes, stored); for an index, every platform manifest it lists (or
those ``platforms`` select; the index itself is stored whole and unchanged, its digest being
the one clients pin); for each image manifest, its config and layers through :class:`Fills`:
the prefetch joins the single-flight download, awaits its verified end and its commit, and
leaves. A blob already cached is not fetched again; its repository is still confirmed to hold
it (from the catalogue, else by a HEAD upstream), exactly as a pull would. At most
``concurrency`` blobs download at once in one run, and a blob two references share is fetched
once.

``serve`` runs this for ``pins:`` that are not complete in the cache (:mod:`.pinfetch`), the
CLI for ``ocicache prefetch`` and ``export``, and the admin API for ``POST /admin/v1/prefetch``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from proxy.airgap.graph import Descriptor, children, selected
from proxy.core.errors import OciError
from proxy.core.imageref import ImageRef
from proxy.core.mediatypes import NotAManifest
from proxy.core.reference import Digest
from proxy.flows.engine import Engine
from proxy.flows.fill import FillFailed
from proxy.store.catalogue import Catalogue
from proxy.store.pins import closure, roots_of
from proxy.upstream.client import UpstreamClient

log = structlog.get_logger("ocicache.prefetch")

# Blobs downloading at once in one run (a layer is a long download; a few at once fill a link
# without queueing behind one another for the upstream's connection slots).
DEFAULT_CONCURRENCY: Final = 4
# References resolved at once (manifests are short requests; this bounds a list of thousands).
REFERENCES_AT_ONCE: Final = 8
# Indexes inside indexes followed this deep; real images have one level.
NESTING_MAX: Final = 4


class PrefetchProgress(Protocol):
    """What a prefetch tells as it goes. Every method is called on the event loop thread and
    must return quickly; :class:`NoProgress` is a base that ignores everything."""

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        """A download began (or was joined): ``size`` if upstream or the manifest said it."""

    def blob_advanced(self, digest: str, received: int) -> None:
        """``received`` more bytes of it arrived."""

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        """Verified and in the cache; ``fetched`` False: it was there already (no
        :meth:`blob_started` came before)."""

    def blob_failed(self, digest: str, reason: str) -> None:
        """Its download failed; nothing of it is cached."""

    def reference_finished(self, outcome: ReferenceOutcome) -> None:
        """A reference is done, well or not."""


class NoProgress:
    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        pass

    def blob_advanced(self, digest: str, received: int) -> None:
        pass

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        pass

    def blob_failed(self, digest: str, reason: str) -> None:
        pass

    def reference_finished(self, outcome: ReferenceOutcome) -> None:
        pass


@dataclass
class ReferenceOutcome:
    reference: ImageRef
    digest: str | None = None  # what the reference resolved to
    media_type: str | None = None
    platforms: tuple[str, ...] = ()  # of an index: the platforms fetched
    manifests: int = 0
    blobs: int = 0  # configs and layers it needs (fetched or cached)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": str(self.reference),
            "digest": self.digest,
            "media_type": self.media_type,
            "platforms": list(self.platforms),
            "manifests": self.manifests,
            "blobs": self.blobs,
            "ok": self.ok,
            "error": self.error,
        }


@dataclass
class PrefetchReport:
    references: list[ReferenceOutcome] = field(default_factory=list)
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    bytes_cached: int = 0
    manifests: int = 0

    @property
    def failed(self) -> list[ReferenceOutcome]:
        return [o for o in self.references if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        failed = len(self.failed)
        refs = f"{len(self.references)} reference{'s' if len(self.references) != 1 else ''}"
        if failed:
            refs += f" ({failed} failed)"
        return (
            f"{refs}; {self.blobs_fetched} blobs fetched ({human_bytes(self.bytes_fetched)}), "
            f"{self.blobs_cached} already cached ({human_bytes(self.bytes_cached)}); "
            f"{self.manifests} manifests"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "references": [o.as_dict() for o in self.references],
            "blobs_fetched": self.blobs_fetched,
            "blobs_cached": self.blobs_cached,
            "bytes_fetched": self.bytes_fetched,
            "bytes_cached": self.bytes_cached,
            "manifests": self.manifests,
            "ok": self.ok,
        }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class PrefetchError(Exception):
    """Why one reference could not be put into the cache (the message names it)."""


def reason(err: BaseException) -> str:
    if isinstance(err, OciError):
        status = err.detail.get("status") if isinstance(err.detail, dict) else None
        text = f"{err.code.value}: {err.message}"
        return f"{text} (upstream status {status})" if status is not None else text
    return str(err) or type(err).__name__


def complete(catalogue: Catalogue, ref: ImageRef) -> bool:
    """Whether the cache holds ``ref``'s manifest and everything it needs, every platform."""
    roots = roots_of(ref, catalogue.tags)
    if not roots:
        return False
    return all(d in catalogue.blobs for d in closure(roots, catalogue.manifests))


async def prefetch(
    engine: Engine,
    references: list[ImageRef],
    *,
    platforms: frozenset[str] | None = None,
    progress: PrefetchProgress | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> PrefetchReport:
    """Put ``references`` into the cache; one outcome per reference, in their order."""
    run = _Run(engine, platforms, progress or NoProgress(), concurrency)
    outcomes = await asyncio.gather(*(run.reference(ref) for ref in references))
    run.report.references = list(outcomes)
    return run.report


class _Run:
    def __init__(
        self, engine: Engine, platforms: frozenset[str] | None, progress: PrefetchProgress, concurrency: int
    ) -> None:
        self.engine = engine
        self.platforms = platforms
        self.progress = progress
        self.report = PrefetchReport()
        self._downloads = asyncio.Semaphore(max(1, concurrency))
        self._references = asyncio.Semaphore(REFERENCES_AT_ONCE)
        # One task per digest in this run, which every reference needing it awaits.
        self._blobs: dict[str, asyncio.Task[None]] = {}

    async def reference(self, ref: ImageRef) -> ReferenceOutcome:
        outcome = ReferenceOutcome(ref)
        async with self._references:
            try:
                client = self.engine.upstreams.get(ref.upstream)
                if client is None:
                    raise PrefetchError(f"registry {ref.upstream!r} is not configured")
                target: Digest | str = ref.digest if ref.digest is not None else str(ref.tag)
                served = await self.engine.manifests.get(client, ref.repository, target, [])
                outcome.digest, outcome.media_type = str(served.digest), served.media_type
                await self._walk(ref, client, served.body, outcome, 0, {served.digest.hex})
            except (OciError, FillFailed, PrefetchError, NotAManifest, OSError) as err:
                outcome.error = reason(err)
                log.info("prefetch_failed", reference=str(ref), reason=outcome.error)
        self.progress.reference_finished(outcome)
        return outcome

    async def _walk(
        self,
        ref: ImageRef,
        client: UpstreamClient,
        body: bytes,
        outcome: ReferenceOutcome,
        depth: int,
        walked: set[str],
    ) -> None:
        """``walked``: the manifests of this reference already walked (an index may list one
        many times, nested: each is walked once)."""
        outcome.manifests += 1
        self.report.manifests += 1
        # Hook for referrers (issue 15): ``--with-referrers`` follows the referrers of every
        # manifest walked here (a keyword argument of prefetch(), off by default).
        kids = children(body)
        if not kids.is_index:
            outcome.blobs += len(kids.blobs)
            await _all(self._blob(ref, client, d) for d in kids.blobs)
            return
        if depth >= NESTING_MAX:
            raise PrefetchError(f"indexes nested deeper than {NESTING_MAX}")
        chosen = selected(kids.manifests, self.platforms)
        if not chosen and self.platforms is not None:
            offered = ", ".join(sorted({d.platform or "none" for d in kids.manifests})) or "none"
            raise PrefetchError(
                f"the index has no manifest for {', '.join(sorted(self.platforms))} (it has: {offered})"
            )
        if depth == 0:
            outcome.platforms = tuple(d.platform or "unknown" for d in chosen)

        async def child(d: Descriptor) -> None:
            digest = Digest.parse(d.digest)
            if digest.hex in walked:
                return
            walked.add(digest.hex)
            served = await self.engine.manifests.get(client, ref.repository, digest, [])
            await self._walk(ref, client, served.body, outcome, depth + 1, walked)

        await _all(child(d) for d in chosen)

    async def _blob(self, ref: ImageRef, client: UpstreamClient, d: Descriptor) -> None:
        digest = Digest.parse(d.digest)
        task = self._blobs.get(d.digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(ref, client, digest, d.size))
            self._blobs[d.digest] = task
            first = True
        else:
            first = False
        await asyncio.shield(task)
        if not first:
            # Fetched for another reference of this run: this repository must hold it too.
            await self.engine.access.check(client, ref.repository, digest)

    async def _fetch(self, ref: ImageRef, client: UpstreamClient, digest: Digest, size: int) -> None:
        if await self._cached(client, ref.repository, digest):
            return
        async with self._downloads:
            if await self._cached(client, ref.repository, digest):
                return
            await self._download(ref, client, digest, size)

    async def _cached(self, client: UpstreamClient, repository: str, digest: Digest) -> bool:
        cache = self.engine.cache
        if digest not in cache or self.engine.fills.get(digest) is not None:
            return False
        await self.engine.access.check(client, repository, digest)
        size = cache.size_of(digest) or 0
        self.report.blobs_cached += 1
        self.report.bytes_cached += size
        self.progress.blob_finished(str(digest), size, fetched=False)
        return True

    async def _download(self, ref: ImageRef, client: UpstreamClient, digest: Digest, size: int) -> None:
        key = str(digest)
        fills = self.engine.fills
        fill, _ = fills.join(digest, client, ref.repository)
        sent = 0
        try:
            self.progress.blob_started(ref, key, size)
            while not fill.verified:
                try:
                    limit = await fill.wait_beyond(sent)
                except FillFailed:
                    assert fill.error is not None
                    raise fill.error from None
                self.progress.blob_advanced(key, limit - sent)
                sent = limit
        except BaseException as err:
            self.progress.blob_failed(key, reason(err))
            raise
        finally:
            fills.leave(fill)
        # Verified; its commit (fsync, rename, index) follows. Waiting for the task never
        # cancels it.
        if fill.task is not None:
            await asyncio.wait([fill.task])
        if fill.written > sent:
            self.progress.blob_advanced(key, fill.written - sent)
        if not fill.committed or digest not in self.engine.cache:
            why = "the cache disk is full" if fill.window is not None else "it could not be stored"
            self.progress.blob_failed(key, f"verified but not cached: {why}")
            raise PrefetchError(f"{key}: verified but not cached: {why}")
        if fill.written != size:
            # A pull would fail here too (clients check the descriptor's size).
            self.progress.blob_failed(key, "size differs from the manifest's descriptor")
            raise PrefetchError(f"{key}: {fill.written} bytes, the manifest says {size}")
        if fill.upstream is not client or fill.repository != ref.repository:
            await self.engine.access.check(client, ref.repository, digest)
        self.report.blobs_fetched += 1
        self.report.bytes_fetched += fill.written
        self.progress.blob_finished(key, fill.written, fetched=True)
        log.info("prefetch_blob", reference=str(ref), digest=key, bytes=fill.written)


async def _all(work: Iterable[Any]) -> None:
    """Run every coroutine to its end (so that one failure does not stop the other layers
    from reaching the cache), then raise the first failure."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
