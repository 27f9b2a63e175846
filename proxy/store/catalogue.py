"""What the cache knows about itself: blobs, manifests, tags, pins and access confirmations.

Everything but the confirmations lives in memory, read once at start-up from the database
(:mod:`proxy.store.db`) after the files and the rows were made to agree
(:mod:`proxy.store.reconcile`); changes go to memory at once and to the database through its
one writer thread. So the warm paths cost no database round trip: a hit moves the blob to the
young end of the LRU order and counts it, and those counts and last-use times are written in
batches every few seconds, so that LRU order survives a restart. Confirmations (a repository
holds a digest) can be many more; they are read from the database on a miss and kept in a
bounded memory of recent ones. Referrers answers (per subject, as upstream last gave them) are
kept the same way: they can be large, and only the subjects being asked about need memory. The
referrers the cache holds itself (manifests whose ``subject`` names another) are indexed in
memory by subject, in step with the manifests.

Which writes are awaited (durable before the caller goes on) and which are only queued:

* a manifest's rows are committed *before* its file is written, so that a file without a row
  is always a blob (see reconcile); a blob's row is committed after its rename;
* tag answers, referrers answers and confirmations are awaited, so a client's answer
  survives a kill -9;
* hit counts, last-use times and removals are queued.

Touched only from the event loop thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import structlog
from cachetools import LRUCache

from proxy.core.mediatypes import Described
from proxy.core.referrers import Descriptor, decode, encode
from proxy.store.db import Database
from proxy.store.migrate import migrate_records, remove_records
from proxy.store.reconcile import BLOB, MANIFEST, Loaded, decode_list, drop_rows, encode_list, reconcile
from proxy.store.storage import Storage

__all__ = [
    "BLOB",
    "MANIFEST",
    "BlobEntry",
    "Catalogue",
    "ManifestInfo",
    "ReferrersAnswer",
    "ReferrersKey",
    "TagAnswer",
    "TagKey",
]

log = structlog.get_logger("ocicache.catalogue")

# Hit counts and last-use times are written this often.
FLUSH_EVERY: Final = 5.0
# Access confirmations kept in memory (the rest are a database read away).
HOLDERS_MEMORY: Final = 100_000
_PUT_REFERRERS: Final = "INSERT OR REPLACE INTO referrers VALUES (?, ?, ?, ?, ?, ?, ?)"
# Bytes of stored referrers answers kept in memory (the rest are a database read away).
REFERRERS_MEMORY: Final = 16 * 1024 * 1024


@dataclass(slots=True)
class BlobEntry:
    size: int  # as verified when the file was committed
    kind: int  # BLOB | MANIFEST
    added: float
    last_used: float
    hits: int = 0


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    media_type: str
    size: int
    platforms: tuple[str, ...] = ()
    children: tuple[str, ...] = ()
    subject: str | None = None
    artifact_type: str | None = None

    @classmethod
    def of(cls, media_type: str, size: int, described: Described) -> ManifestInfo:
        return cls(
            media_type,
            size,
            described.platforms,
            described.children,
            described.subject,
            described.artifact_type,
        )


@dataclass(frozen=True, slots=True)
class TagAnswer:
    digest: str
    media_type: str
    fetched: float


# (upstream, repository, tag)
TagKey = tuple[str, str, str]
# (upstream, repository, subject digest)
ReferrersKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ReferrersAnswer:
    """Upstream's referrers of a subject, unfiltered, as last fetched."""

    descriptors: tuple[Descriptor, ...]
    fetched: float
    api: bool  # from upstream's referrers API (False: from its fallback tag, or neither)
    truncated: bool  # upstream had more than the bound; those were left out
    size: int = 0  # bytes stored, for the memory bound


class Catalogue:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.db = Database(storage.root / "index.db")
        self.blobs: OrderedDict[str, BlobEntry] = OrderedDict()  # least recently used first
        self.total = 0
        self.manifests: dict[str, ManifestInfo] = {}
        self.tags: dict[TagKey, dict[str, TagAnswer]] = {}
        self.pins: dict[str, str] = {}  # reference -> "config" | "admin"
        self._tags_of: dict[str, set[TagKey]] = {}  # manifest digest -> tags answering it
        # subject digest -> the manifests held that name it as their subject
        self.referrers_of: dict[str, set[str]] = {}
        self._referrer_answers: LRUCache[ReferrersKey, ReferrersAnswer] = LRUCache(
            maxsize=REFERRERS_MEMORY, getsizeof=lambda answer: 200 + answer.size
        )
        # Bumped whenever a tag's answers or a manifest change: what remembers an answer (the
        # warm manifest path) checks it instead of looking everything up again.
        self.version = 0
        self._holders: LRUCache[tuple[str, str, str], bool] = LRUCache(maxsize=HOLDERS_MEMORY)
        self._dirty: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        # Called with a digest that left the catalogue (open descriptors, bodies in memory).
        self.drop_observers: list[Callable[[str], None]] = []

    # --- life ---------------------------------------------------------------------------------

    async def open(self) -> Loaded:
        await self.db.open()
        migrated = await self.db.run(lambda conn: migrate_records(conn, self.storage))
        if migrated:
            await asyncio.to_thread(remove_records, self.storage)
        loaded = await self.db.run(lambda conn: reconcile(conn, self.storage))
        for digest, size, kind, added, last_used, hits in loaded.blobs:
            self.blobs[digest] = BlobEntry(size, kind, added, last_used, hits)
            self.total += size
        for digest, media_type, size, platforms, children, subject, artifact in loaded.manifests:
            self.manifests[digest] = ManifestInfo(
                media_type, size, decode_list(platforms), decode_list(children), subject, artifact
            )
            if subject is not None:
                self.referrers_of.setdefault(subject, set()).add(digest)
        for upstream, repository, tag, accept, digest, media_type, fetched in loaded.tags:
            key = (upstream, repository, tag)
            self.tags.setdefault(key, {})[accept] = TagAnswer(digest, media_type, fetched)
            self._tags_of.setdefault(digest, set()).add(key)
        self.pins = {reference: source for reference, source, _ in loaded.pins}
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="catalogue flush")
        log.info(
            "catalogue_loaded", root=str(self.storage.root), migrated_records=migrated, **loaded.summary()
        )
        return loaded

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        self._flush()
        await self.db.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            self._flush()

    def _flush(self) -> None:
        if not self._dirty:
            return
        rows = [(e.last_used, e.hits, d) for d in self._dirty if (e := self.blobs.get(d)) is not None]
        self._dirty.clear()
        self.db.submit(
            lambda conn: conn.executemany("UPDATE blobs SET last_used = ?, hits = ? WHERE digest = ?", rows)
        )

    async def flushed(self) -> None:
        """Write what is pending and wait until it is committed (tests, and before a copy)."""
        self._flush()
        await self.db.run(lambda conn: None)

    # --- blobs --------------------------------------------------------------------------------

    def entry(self, digest: str) -> BlobEntry | None:
        return self.blobs.get(digest)

    def has(self, digest: str, kind: int) -> bool:
        entry = self.blobs.get(digest)
        return entry is not None and entry.kind & kind != 0

    def touch(self, digest: str) -> None:
        """A hit: young again in the LRU order, counted; written with the next batch."""
        entry = self.blobs.get(digest)
        if entry is None:
            return
        self.blobs.move_to_end(digest)
        entry.last_used = time.time()
        entry.hits += 1
        self._dirty.add(digest)

    async def add_blob(self, digest: str, size: int, kind: int = BLOB) -> None:
        """A file committed under ``blobs/``: indexed at once, its row written before this
        returns (best effort: if the row cannot be written, reconciliation indexes the file)."""
        self._index(digest, size, kind)
        try:
            await self.db.run(_upsert_blob(digest, size, kind, time.time()))
        except sqlite3.Error as exc:
            log.warning("catalogue_blob_not_stored", digest=digest, error=str(exc))

    def _index(self, digest: str, size: int, kind: int) -> None:
        now = time.time()
        entry = self.blobs.get(digest)
        if entry is None:
            self.blobs[digest] = BlobEntry(size, kind, now, now)
            self.total += size
        else:
            entry.kind |= kind
            entry.last_used = now
        self.blobs.move_to_end(digest)

    def drop(self, digest: str) -> BlobEntry | None:
        """Forget a digest whose file is removed (eviction, a purge, a bad file), with the
        manifest and tag facts that need it. The caller removes the file *before* the row
        goes, so a crash between leaves a row without a file, which start-up drops."""
        entry = self.blobs.pop(digest, None)
        if entry is None:
            return None
        self.total -= entry.size
        self._dirty.discard(digest)
        self.version += 1
        info = self.manifests.pop(digest, None)
        if info is not None and info.subject is not None:
            self._unrefer(info.subject, digest)
        for key in self._tags_of.pop(digest, set()):
            answers = self.tags.get(key, {})
            for accept in [a for a, answer in answers.items() if answer.digest == digest]:
                del answers[accept]
            if not answers:
                self.tags.pop(key, None)
        for observe in self.drop_observers:
            observe(digest)
        self.db.submit(lambda conn: drop_rows(conn, [digest]))
        return entry

    def lru(self) -> Iterator[tuple[str, BlobEntry]]:
        """Oldest first."""
        return iter(list(self.blobs.items()))

    # --- manifests ----------------------------------------------------------------------------

    async def persist_manifest(self, digest: str, info: ManifestInfo) -> bool:
        """Commit a manifest's rows; call before its file is written, then :meth:`index_manifest`.
        False when the rows cannot be stored (a full disk): then do not write the file."""
        try:
            await self.db.run(_upsert_manifest(digest, info, time.time()))
        except sqlite3.Error as exc:
            log.warning("catalogue_manifest_not_stored", digest=digest, error=str(exc))
            return False
        return True

    def index_manifest(self, digest: str, info: ManifestInfo) -> None:
        self._index(digest, info.size, MANIFEST)
        self.manifests[digest] = info
        if info.subject is not None:
            self.referrers_of.setdefault(info.subject, set()).add(digest)
        self.version += 1

    def _unrefer(self, subject: str, digest: str) -> None:
        held = self.referrers_of.get(subject)
        if held is not None:
            held.discard(digest)
            if not held:
                del self.referrers_of[subject]

    # --- referrers answers --------------------------------------------------------------------

    async def referrers_answer(self, key: ReferrersKey) -> ReferrersAnswer | None:
        """The stored answer for a subject, if we still hold the subject."""
        if key[2] not in self.manifests:
            # Its rows went with the subject; what memory still has is not to be served.
            self._referrer_answers.pop(key, None)
            return None
        answer = self._referrer_answers.get(key)
        if answer is not None:
            return answer
        row = await self.db.run(
            lambda conn: conn.execute(
                "SELECT fetched, api, truncated, descriptors FROM referrers"
                " WHERE upstream = ? AND repository = ? AND subject = ?",
                key,
            ).fetchone()
        )
        if row is None or key[2] not in self.manifests:
            return None
        fetched, api, truncated, text = row
        answer = ReferrersAnswer(decode(text), fetched, bool(api), bool(truncated), len(text))
        self._referrer_answers[key] = answer
        return answer

    async def put_referrers_answer(self, key: ReferrersKey, answer: ReferrersAnswer) -> bool:
        """Store upstream's answer for a subject we hold (False, and nothing stored, for one we
        do not: its answer could never be dropped with it); durable before it returns."""
        if key[2] not in self.manifests:
            return False
        text = encode(answer.descriptors)
        answer = ReferrersAnswer(answer.descriptors, answer.fetched, answer.api, answer.truncated, len(text))
        row = (*key, answer.fetched, int(answer.api), int(answer.truncated), text)
        try:
            await self.db.run(lambda conn: conn.execute(_PUT_REFERRERS, row))
        except sqlite3.Error as exc:
            log.warning("catalogue_referrers_not_stored", upstream=key[0], repository=key[1], error=str(exc))
            return False
        if key[2] not in self.manifests:
            # Dropped while the row was written: its removal, queued after, took the row too.
            return False
        self._referrer_answers[key] = answer
        return True

    def forget_manifest_rows(self, digest: str) -> None:
        """Undo :meth:`persist_manifest` when the file could not be written."""
        if digest in self.blobs:
            kind = self.blobs[digest].kind & ~MANIFEST
            self.db.submit(lambda conn: _unmark_manifest(conn, digest, kind))
        else:
            self.db.submit(lambda conn: drop_rows(conn, [digest]))

    # --- tags ---------------------------------------------------------------------------------

    def answers(self, key: TagKey) -> dict[str, TagAnswer]:
        return self.tags.get(key, {})

    def tag_names(self, upstream: str, repository: str) -> list[str]:
        """The tags of a repository this cache can answer (a scan: for offline listings)."""
        return [tag for (u, r, tag) in self.tags if u == upstream and r == repository]

    async def put_answers(self, key: TagKey, answers: dict[str, TagAnswer]) -> None:
        """Replace a tag's answers (the caller bounds how many); durable before it returns."""
        old = self.tags.get(key, {})
        for answer in old.values():
            holders = self._tags_of.get(answer.digest)
            if holders is not None:
                holders.discard(key)
        self.tags[key] = dict(answers)
        self.version += 1
        for answer in answers.values():
            self._tags_of.setdefault(answer.digest, set()).add(key)
        rows = [(*key, accept, a.digest, a.media_type, a.fetched) for accept, a in answers.items()]
        try:
            await self.db.run(lambda conn: _replace_tag(conn, key, rows))
        except sqlite3.Error as exc:
            log.warning("catalogue_tag_not_stored", upstream=key[0], repository=key[1], error=str(exc))

    def drop_tag(self, key: TagKey) -> None:
        self.version += 1
        for answer in self.tags.pop(key, {}).values():
            holders = self._tags_of.get(answer.digest)
            if holders is not None:
                holders.discard(key)
        self.db.submit(lambda conn: _replace_tag(conn, key, []))

    # --- confirmations ------------------------------------------------------------------------

    async def holds(self, upstream: str, repository: str, digest: str) -> bool:
        key = (upstream, repository, digest)
        if key in self._holders:
            return True
        found = await self.db.run(
            lambda conn: (
                conn.execute(
                    "SELECT 1 FROM holders WHERE upstream = ? AND repository = ? AND digest = ?", key
                ).fetchone()
                is not None
            )
        )
        if found:
            self._holders[key] = True
        return found

    def holds_in_memory(self, upstream: str, repository: str, digest: str) -> bool:
        return (upstream, repository, digest) in self._holders

    async def add_holder(self, upstream: str, repository: str, digest: str) -> None:
        """Remember a confirmation; in memory only once it is committed, so one lost to a full
        disk is asked for again rather than missing after a restart."""
        key = (upstream, repository, digest)
        if key in self._holders:
            return
        try:
            await self.db.run(
                lambda conn: conn.execute("INSERT OR IGNORE INTO holders VALUES (?, ?, ?)", key)
            )
        except sqlite3.Error as exc:
            log.warning("access_not_stored", upstream=upstream, repository=repository, error=str(exc))
            return
        self._holders[key] = True

    # --- pins ---------------------------------------------------------------------------------

    async def set_pins(self, references: Iterable[str], source: str) -> None:
        """Make the pins of ``source`` exactly ``references`` (config pins at every start)."""
        wanted = set(references)
        now = time.time()
        for reference in [r for r, s in self.pins.items() if s == source and r not in wanted]:
            del self.pins[reference]
        for reference in wanted:
            self.pins[reference] = source
        rows = [(r, source, now) for r in sorted(wanted)]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM pins WHERE source = ?", (source,))
            conn.executemany("INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", rows)

        await self.db.run(write)

    async def add_pin(self, reference: str, source: str) -> None:
        self.pins[reference] = source
        now = time.time()
        await self.db.run(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO pins VALUES (?, ?, ?)", (reference, source, now)
            )
        )

    async def remove_pin(self, reference: str) -> bool:
        if self.pins.pop(reference, None) is None:
            return False
        await self.db.run(lambda conn: conn.execute("DELETE FROM pins WHERE reference = ?", (reference,)))
        return True


def _upsert_blob(digest: str, size: int, kind: int, now: float) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO blobs (digest, size, kind, added, last_used, hits) VALUES (?, ?, ?, ?, ?, 0)"
            " ON CONFLICT (digest) DO UPDATE SET kind = kind | excluded.kind, size = excluded.size,"
            " last_used = excluded.last_used",
            (digest, size, kind, now, now),
        )

    return write


def _upsert_manifest(digest: str, info: ManifestInfo, now: float) -> Callable[[sqlite3.Connection], None]:
    def write(conn: sqlite3.Connection) -> None:
        _upsert_blob(digest, info.size, MANIFEST, now)(conn)
        conn.execute(
            "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                digest,
                info.media_type,
                info.size,
                encode_list(info.platforms),
                encode_list(info.children),
                info.subject,
                info.artifact_type,
            ),
        )

    return write


def _unmark_manifest(conn: sqlite3.Connection, digest: str, kind: int) -> None:
    conn.execute("DELETE FROM manifests WHERE digest = ?", (digest,))
    conn.execute("DELETE FROM tags WHERE digest = ?", (digest,))
    conn.execute("DELETE FROM referrers WHERE subject = ?", (digest,))
    conn.execute("UPDATE blobs SET kind = ? WHERE digest = ?", (kind, digest))


def _replace_tag(
    conn: sqlite3.Connection, key: TagKey, rows: list[tuple[str, str, str, str, str, str, float]]
) -> None:
    conn.execute("DELETE FROM tags WHERE upstream = ? AND repository = ? AND tag = ?", key)
    conn.executemany("INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
