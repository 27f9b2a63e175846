"""Plain records the replicas share: tag answers with their fetch time, manifest bodies, brief
negative answers, upstream tokens, and which replicas hold which blob.

Each is a cache of what some replica learned from upstream: a reader checks what it gets (a
manifest against its digest, a tag answer's age against its TTL), and Redis being down only
means asking upstream as a lone replica would.
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis

from proxy.cluster.keys import locations_key, manifest_key, negative_key, tag_key, token_key
from proxy.cluster.redisstate import RedisState
from proxy.store.catalogue import TagAnswer

# Shared manifest bodies: the small documents every pull reads first. Larger ones (rare) stay
# local: each replica fetches them itself.
MANIFEST_SHARED_MAX: Final = 1024 * 1024
MANIFEST_TTL: Final = 7 * 86400
TAG_TTL: Final = 30 * 86400
LOCATIONS_TTL: Final = 7 * 86400

# ARGV: key lifetime, then field, value pairs; a value starts with its fetch time, and an
# answer replaces one only if it is newer.
PUT_ANSWERS: Final = """
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local old = cur and tonumber(string.match(cur, '^%S+'))
  local new = tonumber(string.match(ARGV[i + 1], '^%S+'))
  if not old or (new and new > old) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def _encode_answer(answer: TagAnswer) -> str:
    return f"{answer.fetched!r} {answer.digest} {answer.media_type}"


def _decode_answer(raw: bytes) -> TagAnswer | None:
    parts = raw.decode(errors="replace").split(" ")
    if len(parts) != 3:
        return None
    try:
        fetched = float(parts[0])
    except ValueError:
        return None
    return TagAnswer(parts[1], parts[2], fetched)


class Records:
    def __init__(self, state: RedisState, negative_ttl: float) -> None:
        self.state = state
        self.negative_ttl = negative_ttl
        self._put_answers = state.client.register_script(PUT_ANSWERS)

    # --- tags and manifests -------------------------------------------------------------------

    async def answers(self, upstream: str, repository: str, tag: str) -> dict[str, TagAnswer]:
        empty: dict[bytes | str, bytes | str] = {}
        raw = await self.state.call(lambda r: r.hgetall(tag_key(upstream, repository, tag)), empty)
        found = {}
        for accept, value in raw.items():
            answer = _decode_answer(value) if isinstance(value, bytes) else None
            if answer is not None and isinstance(accept, bytes):
                found[accept.decode(errors="replace")] = answer
        return found

    async def put_answers(
        self, upstream: str, repository: str, tag: str, answers: dict[str, TagAnswer]
    ) -> None:
        if not answers:
            return
        args: list[str | int] = [TAG_TTL]
        for accept, answer in answers.items():
            args += [accept, _encode_answer(answer)]
        key = tag_key(upstream, repository, tag)

        async def command(r: Redis) -> None:
            await self._put_answers(keys=[key], args=args)

        await self.state.call(command, None)

    async def manifest(self, digest: str) -> tuple[bytes, str] | None:
        """A manifest body another replica fetched, and its media type (the caller verifies)."""
        raw = await self.state.call(lambda r: r.get(manifest_key(digest)), None)
        if not isinstance(raw, bytes):
            return None
        media_type, sep, body = raw.partition(b"\n")
        if not sep:
            return None
        return body, media_type.decode(errors="replace")

    async def put_manifest(self, digest: str, body: bytes, media_type: str) -> None:
        if len(body) > MANIFEST_SHARED_MAX or "\n" in media_type:
            return
        value = media_type.encode() + b"\n" + body
        await self.state.call(lambda r: r.set(manifest_key(digest), value, ex=MANIFEST_TTL), None)

    # --- upstream's brief "no" ------------------------------------------------------------------

    async def absent(self, upstream: str, repository: str, reference: str) -> bool:
        count = await self.state.call(lambda r: r.exists(negative_key(upstream, repository, reference)), 0)
        return bool(count)

    async def put_absent(self, upstream: str, repository: str, reference: str) -> None:
        if self.negative_ttl <= 0:
            return
        key = negative_key(upstream, repository, reference)
        ms = max(1, round(self.negative_ttl * 1000))
        await self.state.call(lambda r: r.set(key, b"1", px=ms), None)

    async def clear_absent(self, upstream: str, repository: str, reference: str) -> None:
        await self.state.call(lambda r: r.delete(negative_key(upstream, repository, reference)), None)

    # --- upstream tokens ------------------------------------------------------------------------

    async def token(self, upstream: str, who: str, scope: str) -> tuple[str, float] | None:
        """A token and the seconds it has left."""
        key = token_key(upstream, who, scope)

        async def command(r: Redis) -> tuple[str, float] | None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, ttl = await pipe.execute()
            if not isinstance(value, bytes) or not isinstance(ttl, int) or ttl <= 0:
                return None
            return value.decode(errors="replace"), ttl / 1000

        return await self.state.call(command, None)

    async def put_token(self, upstream: str, who: str, scope: str, value: str, seconds: float) -> None:
        if seconds <= 1:
            return
        key = token_key(upstream, who, scope)
        await self.state.call(lambda r: r.set(key, value.encode(), px=round(seconds * 1000)), None)

    # --- which replica holds which blob ---------------------------------------------------------

    async def locations(self, digest: str) -> list[str]:
        empty: set[bytes | str] = set()
        raw = await self.state.call(lambda r: r.smembers(locations_key(digest)), empty)
        return sorted(m.decode(errors="replace") for m in raw if isinstance(m, bytes))

    async def add_location(self, digest: str, url: str) -> None:
        key = locations_key(digest)

        async def command(r: Redis) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.sadd(key, url)
                pipe.expire(key, LOCATIONS_TTL)
                await pipe.execute()

        await self.state.call(command, None)

    async def remove_location(self, digest: str, url: str) -> None:
        await self.state.call(lambda r: r.srem(locations_key(digest), url), None)
