"""Pure: the short-lived bearer tokens the proxy's own token endpoint issues.

A token names a user (or nobody, for an anonymous client), that user's credential epoch, and
an expiry, signed with HMAC-SHA256 under a key the process makes at start::

    ocq1.<base64url(JSON claims)>.<base64url(MAC)>

Verifying one is a MAC and a dict lookup, no bcrypt, so a client that logged in once costs
almost nothing per request. The key is never written down: a restart ends every token, and
clients fetch a new one on their next pull. The epoch ties a token to the user's secrets at
issue time; changing or removing them ends the token at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

PREFIX: Final = "ocq1."


class TokenRejected(ValueError):
    """``forged`` tells a bad signature (a guess, worth counting) from a merely expired one."""

    def __init__(self, reason: str, *, forged: bool) -> None:
        super().__init__(reason)
        self.forged = forged


@dataclass(frozen=True, slots=True)
class Claims:
    user: str | None  # None: an anonymous client's token
    epoch: str
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def is_issued(token: str) -> bool:
    return token.startswith(PREFIX)


class TokenSigner:
    def __init__(self, key: bytes, ttl: float, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 32:
            raise ValueError("a signing key needs at least 32 bytes")
        self._key = key
        self.ttl = int(ttl)
        self._clock = clock

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).digest()

    def issue(self, user: str | None, epoch: str) -> tuple[str, int]:
        """A token, and the time (seconds since the epoch) it was issued."""
        now = int(self._clock())
        claims = {"u": user, "e": epoch, "x": now + self.ttl}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{_b64(self._mac(payload))}", now

    def expired(self, claims: Claims) -> bool:
        return claims.expires <= self._clock()

    def verify(self, token: str) -> Claims:
        body = token.removeprefix(PREFIX)
        payload, _, mac = body.partition(".")
        try:
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            raise TokenRejected("malformed token", forged=True) from None
        if body == token or not hmac.compare_digest(given, self._mac(payload)):
            raise TokenRejected("token not issued by this proxy", forged=True)
        claims = json.loads(_unb64(payload))  # ours: we signed it
        result = Claims(claims["u"], claims["e"], claims["x"])
        if self.expired(result):
            raise TokenRejected("token expired", forged=False)
        return result
