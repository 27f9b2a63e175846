"""What a front worker remembers of the primary's answers, each until its reuse time is up.

Bounded by size (an LRU by bytes), and by time: an entry past its deadline is never
returned. The clock is ``time.monotonic`` unless a test hands in its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from cachetools import LRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Answers kept per worker: manifests are small, and a blob entry is a few numbers.
MEMORY: Final = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    until: float
    value: V
    size: int


class Memo(Generic[K, V]):
    def __init__(self, max_bytes: int = MEMORY, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: LRUCache[K, _Entry[V]] = LRUCache(maxsize=max_bytes, getsizeof=lambda e: e.size)
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.until:
            del self._entries[key]
            return None
        return entry.value

    def put(self, key: K, value: V, seconds: float, size: int = 200) -> None:
        """Remember ``value`` for ``seconds`` (none: forget what was there)."""
        if seconds <= 0 or size > self._entries.maxsize:
            self._entries.pop(key, None)
            return
        self._entries[key] = _Entry(self._clock() + seconds, value, size)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def expired(self) -> list[tuple[K, V]]:
        """Drop and return the entries whose time is up (what they held can be let go)."""
        now = self._clock()
        gone = [(k, e.value) for k, e in self._entries.items() if now >= e.until]
        for k, _ in gone:
            del self._entries[k]
        return gone
