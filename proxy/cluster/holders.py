"""Which repositories upstream confirmed hold which digests, shared by the replicas.

A digest is not a capability: a blob cached through one repository is served for another only
once upstream says that one holds it too (:mod:`proxy.flows.access`). Shared, that fact must
stay exactly as scoped as it is on one replica. CVE-2026-35172 in distribution is what happens
otherwise: its Redis descriptor cache let a repository's dropped blob come back readable when
another repository looked the digest up. So here:

- a repository's facts live under that repository's own key, one field per digest; nothing is
  ever derived from the digest alone, nor from another repository's key;
- a drop (upstream said the repository does not hold it) leaves a tombstone with the time of
  that answer, and a confirmation is written only if it is newer than what is there, in one
  Lua script: a confirmation that was asked before the drop and lands after it, or a replica
  re-publishing what it remembers, cannot bring the entry back;
- confirmations are published only when upstream has just given them, never copied from a
  replica's own memory.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Final

from redis.asyncio import Redis

from proxy.cluster.keys import holders_key
from proxy.cluster.redisstate import RedisState

# A repository's record lives this long after its last change (bounded growth).
HOLDERS_TTL: Final = 30 * 86400

# ARGV: digest, time in ms, 'c' (confirmed) or 'd' (dropped), key lifetime. The newer fact
# wins; at the same millisecond a drop wins.
WRITE: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local kind = string.sub(cur, 1, 1)
  local at = tonumber(string.sub(cur, 3))
  local t = tonumber(ARGV[2])
  if at and (at > t or (at == t and (kind == 'd' or ARGV[3] == 'c'))) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3] .. ':' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class Fact(Enum):
    CONFIRMED = "c"
    DROPPED = "d"
    UNKNOWN = "?"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class SharedHolders:
    def __init__(self, state: RedisState) -> None:
        self.state = state
        self._write = state.client.register_script(WRITE)

    async def fact(self, upstream: str, repository: str, digest: str) -> Fact:
        raw = await self.state.call(lambda r: r.hget(holders_key(upstream, repository), digest), None)
        if not isinstance(raw, bytes) or raw[:2] not in (b"c:", b"d:"):
            return Fact.UNKNOWN
        return Fact.CONFIRMED if raw[:1] == b"c" else Fact.DROPPED

    async def confirm(self, upstream: str, repository: str, digest: str, answered_ms: int) -> bool:
        """Upstream said at ``answered_ms`` that ``repository`` holds ``digest``. False when a
        newer fact (a drop) is there, or Redis is not."""
        return await self._put(upstream, repository, digest, answered_ms, Fact.CONFIRMED)

    async def drop(self, upstream: str, repository: str, digest: str, answered_ms: int) -> bool:
        """Upstream said at ``answered_ms`` that ``repository`` does not hold ``digest``."""
        return await self._put(upstream, repository, digest, answered_ms, Fact.DROPPED)

    async def _put(self, upstream: str, repository: str, digest: str, at: int, fact: Fact) -> bool:
        key = holders_key(upstream, repository)

        async def command(r: Redis) -> bool:
            return bool(await self._write(keys=[key], args=[digest, at, fact.value, HOLDERS_TTL]))

        return await self.state.call(command, False)
