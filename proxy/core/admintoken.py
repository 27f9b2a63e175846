"""Pure: does a request's ``Authorization`` carry the admin token?

Compared in constant time: both sides are hashed to SHA-256 first, so neither the length nor
any prefix of the token shows in how long a refusal takes, and the header is taken as bytes
(``surrogateescape``: aiohttp decodes header bytes that are not UTF-8 that way), so a header
with any bytes at all is a refusal, never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence


def fingerprint(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def carries(values: Sequence[str], expected: bytes) -> bool:
    """``values``: every Authorization header of the request; ``expected``: the token's
    :func:`fingerprint`. Exactly one header, ``Bearer TOKEN``, with the right token."""
    if len(values) != 1:
        return False
    scheme, _, credential = values[0].strip().partition(" ")
    presented = fingerprint(credential.strip())
    # Compare before looking at the scheme, so that a wrong scheme costs what a wrong token does.
    same = hmac.compare_digest(presented, expected)
    return same and scheme.lower() == "bearer"
