"""Pure: what the primary and its front workers say to each other in HTTP headers.

These headers mean something only on the primary's Unix socket, which only this user can
reach. A client's own ``Ocicache-Internal-*`` headers are dropped by the worker before it
relays, and the primary reads them from no other listener; the worker drops the primary's
before an answer leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

PREFIX: Final = "ocicache-internal-"
# Request headers, worker -> primary.
CLIENT: Final = "Ocicache-Internal-Client"  # the client's address
SCHEME: Final = "Ocicache-Internal-Scheme"  # http or https, as the client connected
WORKER: Final = "Ocicache-Internal-Worker"  # which worker relays it (1..N-1), for the log
PORT: Final = "Ocicache-Internal-Port"  # the port the client reached (addresses the primary names)
NO_HOST: Final = "Ocicache-Internal-No-Host"  # the client sent none (the relay must send one)
SECRET: Final = "Ocicache-Internal-Secret"  # on reports: this run's secret, from the primary
PROBE: Final = "Ocicache-Internal-Probe"  # HEAD of a blob: say whether it is cached, fetch nothing
# Response headers, primary -> worker.
REUSE: Final = "Ocicache-Internal-Reuse"  # seconds this answer may answer the same request
FILE: Final = "Ocicache-Internal-File"  # the blob is a whole cached file of this size
USER: Final = "Ocicache-Internal-User"  # the verified user the answer was for
SOURCE: Final = "Ocicache-Internal-Source"  # offline, when the manifest was answered offline

# Paths between the primary and its workers: a worker never relays a client's request there.
PATHS: Final = "/_ocicache/"

# The longest a worker answers from what the primary said, whatever the tag's TTL: the bound
# on how late a purge, an eviction or an expired login reaches it.
REUSE_MAX: Final = 1.0

# Per-connection headers, never relayed (RFC 9110 7.6.1), and those aiohttp sets itself;
# Expect too: the worker's own server has answered it already.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "date",
        "server",
    }
)


def relayable(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers to pass on, either way: none that is per-connection, none of ours."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and not k.lower().startswith(PREFIX)]


def reuse_for(remaining: float, cap: float = REUSE_MAX) -> float:
    """How long a worker may reuse an answer still fresh for ``remaining`` seconds (inf:
    forever); 0 for one that is not (nothing to reuse)."""
    if math.isnan(remaining) or remaining <= 0:
        return 0.0
    return min(remaining, cap)


def parse_reuse(value: str | None) -> float:
    """The primary's reuse header: seconds in [0, REUSE_MAX]; anything else is 0."""
    if value is None or len(value) > 16:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        return 0.0
    return reuse_for(seconds)
