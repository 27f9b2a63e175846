"""The LRU index and its eviction choice; storage's atomic layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

from proxy.core.reference import Digest
from proxy.store.cache import choose_victims
from proxy.store.storage import Storage


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def test_choose_victims_oldest_first_skipping_pinned() -> None:
    lru = [("a", 10), ("b", 10), ("c", 10), ("d", 10)]
    assert choose_victims(lru, set(), 40, 25) == ["a", "b"]
    assert choose_victims(lru, {"a"}, 40, 25) == ["b", "c"]
    assert choose_victims(lru, {"a", "b", "c", "d"}, 40, 25) == []
    assert choose_victims(lru, set(), 20, 25) == []


def test_storage_prepare_removes_interrupted_downloads(tmp_path: Path) -> None:
    s = Storage(tmp_path)
    s.prepare()
    (s.tmp / "partial").write_bytes(b"half a blob")
    s.put_bytes(digest(b"whole"), b"whole")
    s.prepare()
    assert list(s.tmp.iterdir()) == []
    assert [b.ref for b in s.scan()] == [digest(b"whole")]
    # A stray file with a name that is not a digest is not indexed.
    (s.blobs / "sha256" / "not-a-digest").write_bytes(b"x")
    assert [b.ref for b in s.scan()] == [digest(b"whole")]
