"""Pure: the names of everything the replicas share in Redis.

Names, repositories and tags are validated before they get here (they never hold a space), so a
space separates the parts of a key. Every key starts with ``ocicache:`` and its kind.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "ocicache:"


def lease_key(digest: str) -> str:
    return f"{PREFIX}lease:{digest}"


def locations_key(digest: str) -> str:
    """The replicas that hold ``digest`` (their advertised URLs)."""
    return f"{PREFIX}loc:{digest}"


def tag_key(upstream: str, repository: str, tag: str) -> str:
    """A tag's answers, one field per accept key."""
    return f"{PREFIX}tag:{upstream} {repository} {tag}"


def manifest_key(digest: str) -> str:
    return f"{PREFIX}manifest:{digest}"


def holders_key(upstream: str, repository: str) -> str:
    """One repository's confirmations and tombstones, one field per digest: a repository's facts
    live under its own key, never under the digest's."""
    return f"{PREFIX}holders:{upstream} {repository}"


def negative_key(upstream: str, repository: str, reference: str) -> str:
    return f"{PREFIX}absent:{upstream} {repository} {reference}"


def token_key(upstream: str, identity: str, scope: str) -> str:
    """An upstream token for ``scope``, per upstream and the identity that asked for it."""
    return f"{PREFIX}token:{upstream} {identity} {scope}"
