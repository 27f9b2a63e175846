"""Pure: how many connections each client address holds, and whether one more may open.

A listener on a shared network must not let one client (a slowloris, a leaking pool) take all
its connections. Each address (an IPv4 address, an IPv6 /64, as :func:`limiter.address_key`
counts them) may hold at most ``limit`` at once; 0 means no limit. Memory is bounded by the
connections open: an address is forgotten when its last one closes.
"""

from __future__ import annotations


class ConnectionCounts:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def admit(self, key: str) -> bool:
        """Count one more connection from ``key``, if it may have one."""
        held = self._open.get(key, 0)
        if self.limit and held >= self.limit:
            return False
        self._open[key] = held + 1
        return True

    def release(self, key: str) -> None:
        """One connection admitted for ``key`` has closed."""
        held = self._open.get(key, 0)
        if held <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = held - 1

    def held(self, key: str) -> int:
        return self._open.get(key, 0)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def __len__(self) -> int:
        return len(self._open)
