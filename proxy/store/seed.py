"""Write catalogue rows into a cache directory directly, with no proxy running: for benchmarks
and tests that start from a prepared cache (the files must already be in ``blobs/``, verified
by the caller). A proxy started on the directory afterwards reconciles as always."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from proxy.store.catalogue import ManifestInfo
from proxy.store.db import SCHEMA, SCHEMA_VERSION
from proxy.store.reconcile import BLOB, MANIFEST, encode_list


def seed(
    root: Path,
    *,
    blobs: Iterable[tuple[str, int]] = (),
    manifests: Iterable[tuple[str, ManifestInfo]] = (),
    tags: Iterable[tuple[str, str, str, str, str, str]] = (),
    holders: Iterable[tuple[str, str, str]] = (),
) -> None:
    """``blobs``: (digest, size); ``manifests``: (digest, info); ``tags``: (upstream,
    repository, tag, accept key, digest, media type); ``holders``: (upstream, repository,
    digest)."""
    now = time.time()
    conn = sqlite3.connect(root / "index.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, 0)",
            [(d, size, BLOB, now, now) for d, size in blobs],
        )
        for digest, info in manifests:
            conn.execute(
                "INSERT INTO blobs VALUES (?, ?, ?, ?, ?, 0)"
                " ON CONFLICT (digest) DO UPDATE SET kind = kind | excluded.kind",
                (digest, info.size, MANIFEST, now, now),
            )
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
        conn.executemany(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)", [(*t, now) for t in tags]
        )
        conn.executemany("INSERT OR IGNORE INTO holders VALUES (?, ?, ?)", list(holders))
        conn.execute("COMMIT")
    finally:
        conn.close()
