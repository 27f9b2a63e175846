"""The first start on a cache directory of the JSON-record release: its ``records/*.json`` go
into the catalogue, once, and the directory is removed after the rows are committed.

Those records were one file per tag, per manifest's media type and per (repository, blob)
confirmation, named by a hash of a key that they also carry inside. Their tags are either the
old shape (one entry per media type served, which let a v2-only answer stand for a manifest
list) or the current one (one answer per accepted set); both become tag rows, the old shape as
:func:`answers_from_types` explains. Unreadable records are skipped: at worst a tag is asked
of upstream again.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from typing import Any

import structlog

from proxy.core import jsontext
from proxy.core.mediatypes import MANIFEST_MAX, accept_key, describe, is_index
from proxy.core.reference import Digest
from proxy.store.reconcile import MANIFEST, encode_list
from proxy.store.storage import Storage

log = structlog.get_logger("ocicache.migrate")


def answers_from_types(types: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Old tag records: ``{media_type: {digest, fetched}}``. An index entry is the tag's stored
    manifest, right for anyone; a single manifest is filed under its own type, and under
    "anything" too when the record knows no index (the tag is then most likely single-platform;
    a HEAD after the TTL corrects it if not)."""
    converted: dict[str, dict[str, Any]] = {}
    has_index = any(is_index(t) for t in types)
    for media_type, entry in types.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            continue
        answer = {
            "digest": entry["digest"],
            "media_type": media_type,
            "fetched": float(entry.get("fetched", 0)),
        }
        converted[accept_key(frozenset({media_type}))] = answer
        if is_index(media_type) or not has_index:
            converted[accept_key(None)] = answer
    return converted


def migrate_records(conn: sqlite3.Connection, storage: Storage) -> int:
    """Insert the rows of every readable record; returns how many records were read."""
    records = storage.root / "records"
    if not records.is_dir():
        return 0
    count = 0
    for path in sorted(records.glob("*.json")):
        try:
            data = jsontext.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("key"), str):
            continue
        kind, *parts = data["key"].split(" ")
        try:
            if kind == "tag" and len(parts) == 3:
                _tag(conn, parts, data)
            elif kind == "manifest" and len(parts) == 1:
                _manifest(conn, storage, parts[0], data)
            elif kind == "holder" and len(parts) == 3:
                conn.execute("INSERT OR IGNORE INTO holders VALUES (?, ?, ?)", parts)
            else:
                continue
        except (ValueError, TypeError, KeyError):
            continue
        count += 1
    log.info("records_migrated", records=count)
    return count


def remove_records(storage: Storage) -> None:
    shutil.rmtree(storage.root / "records", ignore_errors=True)


def _tag(conn: sqlite3.Connection, parts: list[str], data: dict[str, Any]) -> None:
    answers = data.get("answers")
    if not isinstance(answers, dict):
        types = data.get("types")
        answers = answers_from_types(types) if isinstance(types, dict) else {}
    for accept, answer in answers.items():
        conn.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*parts, accept, str(answer["digest"]), str(answer["media_type"]), float(answer["fetched"])),
        )


def _manifest(conn: sqlite3.Connection, storage: Storage, digest_text: str, data: dict[str, Any]) -> None:
    digest = Digest.parse(digest_text)
    media_type = data.get("media_type")
    body = storage.read_bytes(digest, MANIFEST_MAX)
    if body is None or not isinstance(media_type, str):
        return
    if hashlib.new(digest.algorithm, body).hexdigest() != digest.hex:
        storage.remove(digest)  # changed on disk since it was verified: not ours to keep
        return
    info = describe(body)
    mtime = storage.blob_path(digest).stat().st_mtime
    conn.execute(
        "INSERT INTO blobs (digest, size, kind, added, last_used, hits) VALUES (?, ?, ?, ?, ?, 0)"
        " ON CONFLICT (digest) DO UPDATE SET kind = kind | excluded.kind",
        (digest_text, len(body), MANIFEST, mtime, mtime),
    )
    conn.execute(
        "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            digest_text,
            media_type,
            len(body),
            encode_list(info.platforms),
            encode_list(info.children),
            info.subject,
            info.artifact_type,
        ),
    )
