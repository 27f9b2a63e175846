"""Pulls by image, for the status page's top images: manifest requests by tag (GET or HEAD,
the request a client makes once per pull) counted by how they were answered.

A dict lookup and an increment per manifest request, nothing per blob. Bounded: past
``MAX_IMAGES`` the least pulled half is forgotten (rare; a cache with that many tags pulled
since start has its top images well apart from the tail).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_IMAGES: Final = 10_000

# (upstream, repository, tag)
ImageKey = tuple[str, str, str]


@dataclass(slots=True)
class PullCount:
    pulls: int = 0
    hits: int = 0  # answered from the cache: hit, revalidated, stale, offline
    misses: int = 0  # fetched upstream


_FROM_CACHE: Final = frozenset({"hit", "revalidated", "stale", "offline"})


class Pulls:
    def __init__(self, limit: int = MAX_IMAGES) -> None:
        self._counts: dict[ImageKey, PullCount] = {}
        self._limit = limit

    def count(self, upstream: str, repository: str, tag: str, source: str, n: int = 1) -> None:
        key = (upstream, repository, tag)
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= self._limit:
                self._forget_tail()
            entry = self._counts[key] = PullCount()
        entry.pulls += n
        if source in _FROM_CACHE:
            entry.hits += n
        else:
            entry.misses += n

    def _forget_tail(self) -> None:
        ranked = sorted(self._counts.items(), key=lambda kv: kv[1].pulls, reverse=True)
        self._counts = dict(ranked[: self._limit // 2])

    def top(self, n: int) -> list[tuple[ImageKey, PullCount]]:
        return sorted(self._counts.items(), key=lambda kv: (-kv[1].pulls, kv[0]))[:n]

    def __len__(self) -> int:
        return len(self._counts)
