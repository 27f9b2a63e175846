"""The admin token check: exact, constant-time, and never an exception on a hostile header."""

from __future__ import annotations

import pytest

from proxy.core.admintoken import carries, fingerprint

TOKEN = "s3cret-admin-token-0123456789"
EXPECTED = fingerprint(TOKEN)


def test_the_right_bearer_token_passes() -> None:
    assert carries([f"Bearer {TOKEN}"], EXPECTED)
    assert carries([f"bearer {TOKEN}"], EXPECTED)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        ["Bearer"],
        ["Bearer "],
        [f"Basic {TOKEN}"],
        [f"Token {TOKEN}"],
        [f"Bearer {TOKEN}x"],
        [f"Bearer {TOKEN[:-1]}"],
        [f"Bearer {TOKEN.upper()}"],
        [f"Bearer {TOKEN}", f"Bearer {TOKEN}"],  # two headers: ambiguous, refused
        ["Bearer " + "x" * 100_000],
        ["Bearer t\u00f6ken-\u2603-\U0001f600-0123456789"],
        ["Bearer \udcff\udcfe-not-utf8-bytes"],  # how aiohttp hands over bytes that are not UTF-8
        ["Bearer \x00\x01\x02"],
    ],
)
def test_anything_else_is_refused_without_an_exception(values: list[str]) -> None:
    assert not carries(values, EXPECTED)


def test_the_token_is_compared_as_a_digest_of_fixed_length() -> None:
    # A wrong token of any length is compared as 32 bytes against 32 bytes, so the time a
    # refusal takes says nothing about the token's length or prefix.
    assert len(fingerprint("a")) == len(fingerprint("a" * 10_000)) == 32
