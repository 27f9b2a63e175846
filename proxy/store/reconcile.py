"""Start-up: make the catalogue and ``blobs/`` agree, then read the catalogue into memory.

The file is the truth for content, the row for what the file should be. A file without a row
is indexed as a blob (a crash between a fill's rename and its row; manifests get their row
before their file, so a row-less file is never a manifest). A row without a file is dropped,
with the manifest, tag and pin facts that depended on it. Only names are read here; a file
whose size is not the one verified when it was committed (truncated, or grown, behind our back)
is caught by the size check that runs right after start-up and by every open, and removed with
its row: it is fetched again on its next request. Runs on the database thread, before anything
is served.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from proxy.store.storage import Storage

BLOB = 1
MANIFEST = 2


@dataclass
class Loaded:
    """The catalogue's rows after reconciliation, and what reconciling did."""

    blobs: list[tuple[str, int, int, float, float, int]] = field(default_factory=list)
    manifests: list[tuple[str, str, int, str, str, str | None, str | None]] = field(default_factory=list)
    tags: list[tuple[str, str, str, str, str, str, float]] = field(default_factory=list)
    pins: list[tuple[str, str, float]] = field(default_factory=list)
    indexed: int = 0  # files that had no row
    dropped_rows: int = 0  # rows that had no file

    def summary(self) -> dict[str, Any]:
        return {
            "blobs": len(self.blobs),
            "tags": len(self.tags),
            "indexed": self.indexed,
            "dropped_rows": self.dropped_rows,
        }


def reconcile(conn: sqlite3.Connection, storage: Storage) -> Loaded:
    loaded = Loaded()
    rows = {r[0]: r for r in conn.execute("SELECT digest, size, kind, added, last_used, hits FROM blobs")}
    # Names only: a stat per file was most of the start-up with 100,000 of them. Sizes are
    # checked right after, in the background (BlobCache.start), and at every open, so a file
    # changed behind our back is never served meanwhile.
    names = storage.names()
    gone = [digest for digest in rows if digest not in names]
    loaded.dropped_rows = len(gone)
    drop_rows(conn, gone)
    for digest in gone:
        del rows[digest]
    new = [
        (b.digest, b.size, BLOB, b.mtime, b.mtime, 0)
        for d in names
        if d not in rows and (b := storage.stat(d)) is not None
    ]
    conn.executemany(
        "INSERT INTO blobs (digest, size, kind, added, last_used, hits) VALUES (?, ?, ?, ?, ?, ?)", new
    )
    loaded.indexed = len(new)
    # Facts about manifests that are no longer held go with them.
    conn.execute(
        "DELETE FROM manifests WHERE digest NOT IN (SELECT digest FROM blobs WHERE kind & ? != 0)",
        (MANIFEST,),
    )
    conn.execute("DELETE FROM tags WHERE digest NOT IN (SELECT digest FROM manifests)")
    conn.execute("DELETE FROM referrers WHERE subject NOT IN (SELECT digest FROM manifests)")
    conn.execute("DELETE FROM holders WHERE digest NOT IN (SELECT digest FROM blobs)")
    loaded.blobs = sorted([*rows.values(), *new], key=lambda r: r[4])  # oldest use first
    loaded.manifests = list(
        conn.execute(
            "SELECT digest, media_type, size, platforms, children, subject, artifact_type FROM manifests"
        )
    )
    loaded.tags = list(
        conn.execute("SELECT upstream, repository, tag, accept, digest, media_type, fetched FROM tags")
    )
    loaded.pins = list(conn.execute("SELECT reference, source, added FROM pins"))
    return loaded


def drop_rows(conn: sqlite3.Connection, digests: list[str]) -> None:
    """Forget these digests: their blob rows, the manifest and tag rows that need them, and the
    referrers answers stored for them as subjects."""
    params = [(d,) for d in digests]
    conn.executemany("DELETE FROM blobs WHERE digest = ?", params)
    conn.executemany("DELETE FROM manifests WHERE digest = ?", params)
    conn.executemany("DELETE FROM tags WHERE digest = ?", params)
    conn.executemany("DELETE FROM referrers WHERE subject = ?", params)


def encode_list(values: tuple[str, ...]) -> str:
    """Digests and platforms hold no white space: one space apart, cheap to split at start-up
    (JSON was the largest cost of loading 20,000 manifests)."""
    return " ".join(values)


def decode_list(text: str) -> tuple[str, ...]:
    return tuple(text.split())
