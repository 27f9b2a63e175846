"""Pure: how replicas recognise each other's blob requests.

A peer's request is an ordinary OCI blob GET with ``Authorization: Bearer <cluster token>`` and
a header naming the replica that asks. It is exempt from client authentication and rules (the
asking replica has applied them to its own client), never from the token. A peer that neither
holds a blob nor fetches it from upstream says so (a 404 with :data:`MISS_HEADER`) instead of
fetching it: only a lease holder talks to upstream, and a request between followers could
otherwise go round in a circle.
"""

from __future__ import annotations

import hmac
from typing import Final

PEER_HEADER: Final = "X-Ocicache-Peer"
MISS_HEADER: Final = "X-Ocicache-Peer-Miss"


def presented_token(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def is_peer(authorization: str | None, token: str) -> bool:
    """Does ``authorization`` carry the cluster token (compared in constant time)?"""
    presented = presented_token(authorization)
    if presented is None or not token:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())
