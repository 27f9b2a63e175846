"""The catalogue's SQLite database (``<cache>/index.db``, WAL mode), behind one thread.

Every statement runs on one worker thread that owns the only connection; the event loop never
touches SQLite. Work arrives on a queue as functions of the connection. The thread takes what
is queued, runs it in one transaction (a savepoint per function, so one failure does not undo
the others), commits, and resolves each caller's future: under load one commit covers many
writes. A caller that needs its write durable before it answers a client awaits the future;
one that does not (hit counts) just queues it.

``synchronous=NORMAL`` in WAL mode makes a commit durable against a crash of this process
(kill -9), which is what the cache promises; a power cut may lose the last commits, and the
start-up reconciliation of :mod:`proxy.store.catalogue` repairs what that leaves.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

log = structlog.get_logger("ocicache.db")

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION: Final = 1
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
-- Every file under blobs/: its verified size, and how it is known (1 blob, 2 manifest).
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    added REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    platforms TEXT NOT NULL DEFAULT '',  -- space-separated os/arch[/variant]
    children TEXT NOT NULL DEFAULT '',   -- space-separated digests it needs
    subject TEXT,
    artifact_type TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifests_subject ON manifests (subject) WHERE subject IS NOT NULL;
-- A tag's answer for one set of accepted media types (see proxy.core.mediatypes).
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    accept TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    fetched REAL NOT NULL,
    PRIMARY KEY (upstream, repository, tag, accept)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_digest ON tags (digest);
-- Upstream confirmed that this repository holds this digest.
CREATE TABLE IF NOT EXISTS holders (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repository, digest)
) WITHOUT ROWID;
-- The last referrers answer built from upstream for a subject we hold (its referrers API, or
-- its fallback tag when it has none), before any artifactType filter. Added to schema 1: a
-- release that does not know it leaves it alone, and start-up drops rows whose subject is gone.
CREATE TABLE IF NOT EXISTS referrers (
    upstream TEXT NOT NULL,
    repository TEXT NOT NULL,
    subject TEXT NOT NULL,
    fetched REAL NOT NULL,
    api INTEGER NOT NULL,        -- 1: upstream's referrers API; 0: its fallback tag
    truncated INTEGER NOT NULL,  -- 1: more than referrers_max; the rest left out
    descriptors TEXT NOT NULL,   -- a JSON array of descriptors
    PRIMARY KEY (upstream, repository, subject)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS referrers_subject ON referrers (subject);
CREATE TABLE IF NOT EXISTS pins (
    reference TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    added REAL NOT NULL
) WITHOUT ROWID;
"""
# Most functions one transaction takes: bounds how long one commit holds callers back.
BATCH_MAX: Final = 2000


class Closed(RuntimeError):
    """The database was closed; nothing more is written."""


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[tuple[Work, asyncio.Future[Any] | None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.failures = 0  # writes that could not be committed (a full disk), for metrics

    async def open(self) -> None:
        """Start the thread, open the file and make sure the schema is there."""
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="ocicache-db", daemon=True)
        self._thread.start()
        await ready

    def submit(self, work: Work) -> None:
        """Queue ``work``; nobody waits for it. A failure is logged."""
        if self._closed:
            return
        self._queue.put((work, None))

    def run(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``work``; the future resolves with its result once it is committed."""
        assert self._loop is not None, "open() first"
        fut: asyncio.Future[T] = self._loop.create_future()
        if self._closed:
            fut.set_exception(Closed("catalogue closed"))
            return fut
        self._queue.put((work, fut))
        return fut

    async def close(self) -> None:
        """Commit what is queued, then stop the thread and close the file."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # --- the thread --------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer ocicache (schema {row[0]})")
        return conn

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except BaseException as exc:
            self._loop.call_soon_threadsafe(_fail, ready, exc)
            return
        self._loop.call_soon_threadsafe(_resolve, ready, None)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                batch = [item]
                stop = False
                while len(batch) < BATCH_MAX:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Work, asyncio.Future[Any] | None]]) -> None:
        assert self._loop is not None
        results: list[tuple[asyncio.Future[Any] | None, bool, Any]] = []
        try:
            conn.execute("BEGIN")
            for work, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = work(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, False, exc))
                    if fut is None:
                        log.warning("catalogue_write_failed", error=str(exc))
                    continue
                conn.execute("RELEASE op")
                results.append((fut, True, value))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit itself failed (a full disk): nothing of this batch is stored.
            self.failures += len(batch)
            log.warning("catalogue_commit_failed", error=str(exc), writes=len(batch))
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            results = [(fut, False, exc) for _, fut in batch]
        for fut, ok, value in results:
            if fut is not None:
                self._loop.call_soon_threadsafe(_resolve if ok else _fail, fut, value)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
