"""Pure: how many password and token guesses one client address may make.

Each credential the proxy has to verify (a bcrypt check, a token lookup) costs the address one
attempt; a success is refunded, a failure is not. An address that has spent ``limit`` attempts
within ``window`` seconds of its first is refused until that window ends. Counting attempts
as they start, not failures as they end, means a burst of concurrent guesses cannot all get
in before the first one fails. A success only refunds itself, so one valid account does not
reset the count for guessing at another.

Memory is bounded: past ``capacity`` addresses the least recently seen is forgotten. IPv6
clients are counted per /64, since one host commonly holds the whole prefix.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

DEFAULT_CAPACITY: Final = 10_000


def address_key(remote: str | None) -> str:
    """The unit a limit applies to: the IPv4 address, or the IPv6 /64."""
    if not remote:
        return "unknown"
    if ":" not in remote:
        # IPv4 as the socket reports it is already canonical; this runs on every request.
        return remote[:64]
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(slots=True)
class _Window:
    started: float
    attempts: int


class FailureLimiter:
    def __init__(self, limit: int, window: float, capacity: int = DEFAULT_CAPACITY) -> None:
        if limit < 1 or window <= 0 or capacity < 1:
            raise ValueError("limit, window and capacity must be positive")
        self.limit = limit
        self.window = window
        self._capacity = capacity
        self._seen: OrderedDict[str, _Window] = OrderedDict()

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None if it may try now."""
        entry = self._current(key, now)
        if entry is None or entry.attempts < self.limit:
            return None
        return entry.started + self.window - now

    def attempt(self, key: str, now: float) -> None:
        entry = self._current(key, now)
        if entry is None:
            entry = self._seen[key] = _Window(now, 0)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
        entry.attempts += 1
        self._seen.move_to_end(key)

    def refund(self, key: str) -> None:
        entry = self._seen.get(key)
        if entry is not None and entry.attempts > 0:
            entry.attempts -= 1

    def _current(self, key: str, now: float) -> _Window | None:
        entry = self._seen.get(key)
        if entry is not None and now - entry.started >= self.window:
            del self._seen[key]
            return None
        return entry

    def __len__(self) -> int:
        return len(self._seen)
