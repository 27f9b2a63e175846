"""The per-address limit on password and token guesses."""

from __future__ import annotations

import pytest

from proxy.core.limiter import FailureLimiter, address_key


def test_attempts_past_the_limit_wait_for_the_window() -> None:
    lim = FailureLimiter(limit=3, window=60)
    for _ in range(3):
        assert lim.retry_after("a", 0) is None
        lim.attempt("a", 0)
    assert lim.retry_after("a", 10) == 50
    assert lim.retry_after("b", 10) is None  # another address is not held back
    assert lim.retry_after("a", 60) is None  # the window is over
    lim.attempt("a", 60)
    assert lim.retry_after("a", 61) is None


def test_a_success_refunds_only_itself() -> None:
    lim = FailureLimiter(limit=2, window=60)
    lim.attempt("a", 0)  # a wrong guess
    lim.attempt("a", 1)  # a right one...
    lim.refund("a")  # ...refunded
    assert lim.retry_after("a", 2) is None
    lim.attempt("a", 2)  # another wrong guess: the first still counts
    assert lim.retry_after("a", 3) is not None
    lim.refund("a")
    lim.refund("a")
    lim.refund("a")  # never below zero
    lim.attempt("a", 4)
    lim.attempt("a", 4)
    assert lim.retry_after("a", 4) is not None


def test_memory_is_bounded() -> None:
    lim = FailureLimiter(limit=1, window=60, capacity=100)
    for i in range(1000):
        lim.attempt(f"10.0.{i // 256}.{i % 256}", 0)
    assert len(lim) == 100
    lim.refund("never-seen")


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_address_keys(remote: str | None, key: str) -> None:
    assert address_key(remote) == key


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        FailureLimiter(limit=0, window=1)
