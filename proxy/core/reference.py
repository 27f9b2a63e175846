"""Pure parsing of what a client asks for: repository names, tags, digests, paths and ranges.

The grammars are the OCI distribution spec's ("Pulling manifests"). Everything here runs before
any file path or upstream URL is built, so a value that reaches storage or the network has
already been proven to be made only of ``[a-z0-9._/-]`` (names), ``[A-Za-z0-9._-]`` (tags) or
lowercase hex (digests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final

from proxy.core.errors import Code, OciError

# Components separated by "/"; each is lowercase alphanumerics joined by ".", "_", "__" or "-"s.
NAME_RE: Final = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
TAG_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# distribution limits a repository name (with its registry host) to 255 characters.
NAME_MAX: Final = 255
# Characters a name component may have before routing; ":" for a "host:port" prefix.
_COMPONENT_CHARS: Final = re.compile(r"[a-z0-9._:-]+")
DIGEST_HEX: Final[dict[str, int]] = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        alg, sep, hexpart = text.partition(":")
        want = DIGEST_HEX.get(alg)
        if not sep or want is None:
            raise OciError(Code.DIGEST_INVALID, "unsupported digest algorithm", {"digest": text[:150]})
        if len(hexpart) != want or not _is_lower_hex(hexpart):
            raise OciError(Code.DIGEST_INVALID, "malformed digest", {"digest": text[:150]})
        return cls(alg, hexpart)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


_LOWER_HEX: Final = re.compile(r"[0-9a-f]+")


def _is_lower_hex(text: str) -> bool:
    return _LOWER_HEX.fullmatch(text) is not None


def validate_name(name: str) -> str:
    if len(name) > NAME_MAX or NAME_RE.fullmatch(name) is None:
        raise OciError(Code.NAME_INVALID, "invalid repository name", {"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if TAG_RE.fullmatch(tag) is None:
        raise OciError(Code.TAG_INVALID, "invalid tag", {"tag": tag[:300]})
    return tag


class Kind(Enum):
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"
    # OCI 1.1: the manifests whose ``subject`` is a digest (always addressed by digest).
    REFERRERS = "referrers"


# Kinds addressed by ``/v2/<name>/<kind>/<reference>``.
_REFERENCED: Final = (Kind.MANIFEST, Kind.BLOB, Kind.REFERRERS)


@dataclass(frozen=True, slots=True)
class PathRequest:
    """A /v2 path split into its parts. ``name`` may still carry a registry prefix: routing
    decides what its first component means, then validates the rest with :func:`validate_name`."""

    kind: Kind
    name: str
    # A Digest for blobs, referrers and digest-addressed manifests, a tag string for tagged
    # ones, None for tags/list.
    reference: Digest | str | None


def parse_path(raw_path: str) -> PathRequest:
    """Split the raw (still percent-encoded) path of a ``/v2/...`` request.

    Percent-encoding is refused outright: no valid name, tag or digest needs it, and decoding
    it first is how ``%2e%2e`` and ``%2F`` tricks reach a file system.
    """
    if not raw_path.startswith("/v2/"):
        raise OciError(Code.NAME_UNKNOWN, "not a registry API path")
    if "%" in raw_path:
        raise OciError(Code.NAME_INVALID, "percent-encoded paths are not accepted")
    tail = raw_path[len("/v2/") :]
    if tail.endswith("/tags/list"):
        return PathRequest(Kind.TAGS, _name_part(tail[: -len("/tags/list")]), None)
    # The marker nearest the end decides: a repository may be named like an endpoint word.
    idx, kind = max(((tail.rfind(f"/{k.value}/"), k) for k in _REFERENCED), key=lambda found: found[0])
    if idx > 0:
        name = _name_part(tail[:idx])
        ref = tail[idx + len(kind.value) + 2 :]
        # A tag cannot hold ":", so anything with one was meant as a digest.
        if kind is not Kind.MANIFEST or ":" in ref:
            return PathRequest(kind, name, Digest.parse(ref))
        return PathRequest(kind, name, validate_tag(ref))
    if any(seg in (".", "..") for seg in tail.split("/")):
        raise OciError(Code.NAME_INVALID, "dot segments are not accepted")
    raise OciError(Code.NAME_UNKNOWN, "unknown registry API endpoint")


def _name_part(text: str) -> str:
    # The full check happens after routing strips a registry prefix; this only keeps garbage
    # (dot segments, empty components, stray characters) from getting that far.
    if not text or len(text) > NAME_MAX + 256:
        raise OciError(Code.NAME_INVALID, "invalid repository name", {"name": text[:300]})
    for comp in text.split("/"):
        if comp in ("", ".", "..") or not _COMPONENT_CHARS.fullmatch(comp):
            raise OciError(Code.NAME_INVALID, "invalid repository name", {"name": text[:300]})
    return text
