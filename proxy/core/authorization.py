"""Pure: a client's ``Authorization`` header, and the challenge it gets without a good one.

Clients present ``Basic`` (RFC 7617: base64 of ``user:password``) or ``Bearer`` (RFC 6750: a
token68). Anything else, or anything malformed, is refused with a reason that never quotes
the credential. The challenge is the one the distribution token-auth spec describes (Docker,
containerd and containers/image all follow it)::

    WWW-Authenticate: Bearer realm="https://proxy/auth/token",service="ocicache",scope="repository:library/alpine:pull"

Bearer rather than Basic because Docker applies a Basic challenge to every later request and
refuses to send one without credentials ("no basic auth credentials"), so an anonymous Docker
pull would fail outright; with Bearer it fetches an anonymous token instead.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Final

# Longer than any real credential (a 1 KiB JWT is large), short enough that a hostile client
# cannot make us decode or hash much.
MAX_HEADER: Final = 4096
SERVICE: Final = "ocicache"
_BASE64: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# What a realm or scope may contain: no quote, backslash or control character to break out of
# the quoted-string it goes into.
_QUOTABLE: Final = re.compile(r'[^"\\\x00-\x1f\x7f]*')
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


class BadCredentials(ValueError):
    """A header we cannot use. The message names the problem, never the header's value."""


@dataclass(frozen=True, slots=True)
class Basic:
    username: str
    password: str = field(repr=False)

    @property
    def anonymous(self) -> bool:
        # containers/image sends "Basic Og==" (":") when it has no credentials for a Basic realm.
        return not self.username and not self.password


@dataclass(frozen=True, slots=True)
class Bearer:
    token: str = field(repr=False)


Credential = Basic | Bearer


def parse(value: str) -> Credential:
    """The credential in one ``Authorization`` header value."""
    if len(value) > MAX_HEADER:
        raise BadCredentials("Authorization header too long")
    if not value.isascii():
        raise BadCredentials("Authorization header is not ASCII")
    scheme, _, param = value.strip().partition(" ")
    param = param.strip()
    scheme = scheme.lower()
    if scheme == "basic":
        return _basic(param)
    if scheme == "bearer":
        if not _TOKEN68.fullmatch(param):
            raise BadCredentials("malformed Bearer token")
        return Bearer(param)
    raise BadCredentials("unsupported authorization scheme (Basic or Bearer)")


def _basic(param: str) -> Basic:
    if not _BASE64.fullmatch(param):
        raise BadCredentials("malformed Basic credentials")
    try:
        text = binascii.a2b_base64(param, strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadCredentials("malformed Basic credentials") from None
    username, sep, password = text.partition(":")
    if not sep:
        raise BadCredentials("Basic credentials without a colon")
    if _CONTROL.search(text):
        raise BadCredentials("control characters in Basic credentials")
    return Basic(username, password)


def pull_scope(repository: str) -> str:
    """The token scope for pulling ``repository`` (the name as the client sent it)."""
    return f"repository:{repository}:pull"


def challenge(realm: str, scope: str | None = None, service: str = SERVICE) -> str:
    """A Bearer challenge; a scope that could not be quoted safely is left out."""
    if not _QUOTABLE.fullmatch(realm):
        raise ValueError("realm cannot be quoted")
    parts = [f'realm="{realm}"', f'service="{service}"']
    if scope is not None and _QUOTABLE.fullmatch(scope):
        parts.append(f'scope="{scope}"')
    return "Bearer " + ",".join(parts)
