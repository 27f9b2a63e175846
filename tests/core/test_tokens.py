"""Tokens the proxy issues: they verify, expire, and cannot be forged or altered."""

from __future__ import annotations

import base64
import json

import pytest

from proxy.core.tokens import TokenRejected, TokenSigner, is_issued


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_issue_verify_expire() -> None:
    clock = Clock()
    signer = TokenSigner(b"k" * 32, ttl=300, clock=clock)
    token, issued_at = signer.issue("ci", "epoch1")
    assert is_issued(token) and issued_at == 1_000_000
    claims = signer.verify(token)
    assert (claims.user, claims.epoch) == ("ci", "epoch1")
    anon, _ = signer.issue(None, "")
    assert signer.verify(anon).user is None
    clock.now += 300
    with pytest.raises(TokenRejected) as info:
        signer.verify(token)
    assert not info.value.forged


def test_another_key_or_an_edited_token_is_forged() -> None:
    signer = TokenSigner(b"k" * 32, ttl=300)
    token, _ = signer.issue("dev", "e")
    other = TokenSigner(b"x" * 32, ttl=300)
    prefix, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["u"] = "admin"
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for bad in (
        other.issue("dev", "e")[0],
        f"{prefix}.{edited}.{mac}",
        f"{prefix}.{payload}.",
        f"{prefix}.{payload}",
        f"{prefix}.{payload}.{mac[:-2]}",
        "ocq1.",
        "ocq1.!!!.???",
    ):
        with pytest.raises(TokenRejected) as info:
            signer.verify(bad)
        assert info.value.forged


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenSigner(b"short", ttl=1)
