"""Connections per client address: a limit per address, memory only for addresses with some."""

from __future__ import annotations

from proxy.core.connections import ConnectionCounts


def test_an_address_gets_its_limit_and_no_more() -> None:
    counts = ConnectionCounts(2)
    assert counts.admit("10.0.0.1") and counts.admit("10.0.0.1")
    assert not counts.admit("10.0.0.1")
    assert counts.admit("10.0.0.2")  # others are not held back
    counts.release("10.0.0.1")
    assert counts.admit("10.0.0.1")
    assert counts.held("10.0.0.1") == 2 and counts.total == 3


def test_closed_addresses_are_forgotten() -> None:
    counts = ConnectionCounts(5)
    for i in range(100):
        assert counts.admit(f"10.0.0.{i}")
    for i in range(100):
        counts.release(f"10.0.0.{i}")
    assert len(counts) == 0 and counts.total == 0
    counts.release("never-seen")  # a release without an admit changes nothing
    assert len(counts) == 0


def test_zero_is_no_limit() -> None:
    counts = ConnectionCounts(0)
    assert all(counts.admit("10.0.0.1") for _ in range(10_000))
