"""Shared confirmations stay per repository, and a dropped one never comes back: not through
another repository's confirmation of the same digest (the shape of distribution's
CVE-2026-35172, whose Redis descriptor cache made a repository's deleted blob readable again
once another repository looked it up), not through a confirmation asked before the drop that
lands after it, and not through a replica re-publishing what it remembers."""

from __future__ import annotations

from proxy.cluster.holders import Fact, SharedHolders
from proxy.cluster.keys import holders_key
from proxy.cluster.redisstate import RedisState

D = "sha256:" + "cd" * 32


async def test_a_dropped_repository_entry_never_comes_back(state: RedisState) -> None:
    holders = SharedHolders(state)
    assert await holders.fact("docker.io", "org/private", D) is Fact.UNKNOWN
    assert await holders.confirm("docker.io", "org/private", D, 1_000)
    assert await holders.fact("docker.io", "org/private", D) is Fact.CONFIRMED

    # Upstream says org/private no longer holds it.
    assert await holders.drop("docker.io", "org/private", D, 2_000)
    assert await holders.fact("docker.io", "org/private", D) is Fact.DROPPED

    # Another repository holds the same digest, and says so: org/private stays dropped.
    assert await holders.confirm("docker.io", "org/public", D, 3_000)
    assert await holders.fact("docker.io", "org/public", D) is Fact.CONFIRMED
    assert await holders.fact("docker.io", "org/private", D) is Fact.DROPPED
    # The same repository name on another upstream is another repository.
    assert await holders.fact("ghcr.io", "org/private", D) is Fact.UNKNOWN

    # A replica that asked before the drop and answers late, or re-publishes what it remembers
    # from before: refused.
    assert not await holders.confirm("docker.io", "org/private", D, 1_500)
    assert not await holders.confirm("docker.io", "org/private", D, 2_000)  # a tie: the drop wins
    assert await holders.fact("docker.io", "org/private", D) is Fact.DROPPED

    # Nothing about org/private is kept under the digest or another repository's key.
    keys = {k.decode() if isinstance(k, bytes) else k for k in await state.client.keys("*")}
    assert keys == {holders_key("docker.io", "org/private"), holders_key("docker.io", "org/public")}
    assert await state.client.hkeys(holders_key("docker.io", "org/public")) == [D.encode()]

    # Upstream confirms it again later (pushed back): a fresh answer is believed.
    assert await holders.confirm("docker.io", "org/private", D, 4_000)
    assert await holders.fact("docker.io", "org/private", D) is Fact.CONFIRMED


async def test_a_confirmation_does_not_undo_a_newer_drop_of_another_digest_either(state: RedisState) -> None:
    holders = SharedHolders(state)
    other = "sha256:" + "ef" * 32
    await holders.drop("docker.io", "org/private", D, 5_000)
    await holders.confirm("docker.io", "org/private", other, 6_000)
    assert await holders.fact("docker.io", "org/private", D) is Fact.DROPPED
    assert await holders.fact("docker.io", "org/private", other) is Fact.CONFIRMED


async def test_junk_in_the_record_is_no_confirmation(state: RedisState) -> None:
    holders = SharedHolders(state)
    await state.client.hset(holders_key("docker.io", "org/x"), D, b"yes")
    assert await holders.fact("docker.io", "org/x", D) is Fact.UNKNOWN
