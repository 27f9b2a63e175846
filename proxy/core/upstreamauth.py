"""Pure upstream-authentication logic: challenges, scopes, token URLs, and where credentials and
redirects may go. No I/O here; :mod:`upstream` performs what these functions decide.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from yarl import URL

# auth-param = token BWS "=" BWS ( token / quoted-string ), RFC 9110 11.2.
_PARAM_RE: Final = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
# Tokens without a stated lifetime are good for 60 s (distribution's token spec default).
DEFAULT_TOKEN_TTL: Final = 60.0


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lowercase: "bearer" or "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (registries send one)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def peer_url(text: str, base: URL | None = None, *, encoded: bool = False) -> URL | None:
    """A URL an upstream sent (a redirect's ``Location``, a token realm), resolved against
    ``base``; None when it cannot be read. yarl raises ValueError for an unclosed IPv6 bracket
    or a port past 65535, which a hostile upstream turned into a 500; callers refuse None as
    they refuse an address they may not use."""
    try:
        url = URL(text, encoded=encoded)
        url = url if base is None else base.join(url)
        # yarl splits an encoded netloc lazily: make it do so here, not in a caller.
        url.raw_host, url.port  # noqa: B018
    except ValueError:
        return None
    return url


def token_request_url(challenge: Challenge, scope: str) -> URL:
    realm = URL(challenge.params["realm"])
    query = dict(realm.query)
    if "service" in challenge.params:
        query["service"] = challenge.params["service"]
    query["scope"] = scope
    return realm.with_query(query)


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float

    def fresh(self, now: float | None = None) -> bool:
        # A margin, so that a token does not expire between our check and upstream's.
        return (time.monotonic() if now is None else now) < self.expires_at - 5


def parse_token_response(body: Any, now: float) -> Token | None:
    if not isinstance(body, dict):
        return None
    value = body.get("token") or body.get("access_token")
    if not isinstance(value, str) or not value:
        return None
    ttl = body.get("expires_in")
    lifetime = float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else DEFAULT_TOKEN_TTL
    return Token(value, now + lifetime)


def _origin(url: URL) -> tuple[str, int | None]:
    return ((url.host or "").lower(), url.port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def realm_allowed(realm: URL, upstream: URL, extra_hosts: Iterable[str] = ()) -> bool:
    """May we send this upstream's credentials to ``realm``?

    Yes for the upstream's own origin, for hosts the configuration lists (``host`` or
    ``host:port``), and for a sibling DNS name under the upstream's parent domain on the same
    port (``auth.docker.io`` for ``registry-1.docker.io``; ``gitlab.com`` for
    ``registry.gitlab.com``). No otherwise: a registry does not get to name where our
    credentials go (CVE-2026-33540 in distribution's proxy). Plain http only when the upstream
    itself is plain http.
    """
    if realm.scheme not in ("http", "https") or not realm.host:
        return False
    if realm.scheme == "http" and upstream.scheme != "http":
        return False
    r_host, r_port = _origin(realm)
    u_host, u_port = _origin(upstream)
    for allowed in extra_hosts:
        host, _, port = allowed.lower().partition(":")
        if host == r_host and (not port or (port.isdigit() and int(port) == r_port)):
            return True
    if (r_host, r_port) == (u_host, u_port):
        return True
    if r_port != u_port or _is_ip(r_host) or _is_ip(u_host):
        return False
    labels = u_host.split(".")
    if len(labels) < 3:
        return False
    parent = ".".join(labels[1:])
    return r_host == parent or r_host.endswith("." + parent)


def is_private_address(host: str) -> bool:
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_reserved
        or addr.is_multicast
        or addr.is_unspecified
    )


def redirect_allowed(target: URL, upstream: URL) -> bool:
    """May a redirect from this upstream send us to ``target``?

    Not to loopback, link-local (cloud metadata at 169.254.169.254), private or otherwise
    special addresses, unless the upstream itself lives at such an address (a registry on the
    same LAN redirecting to its own storage). Only http(s).
    """
    if target.scheme not in ("http", "https") or not target.host:
        return False
    if not is_private_address(target.host.lower()):
        return True
    return is_private_address((upstream.host or "").lower())


def resolved_allowed(host: str, addresses: list[str], trusted_hosts: frozenset[str]) -> list[str]:
    """The addresses a name may be dialled at. A name we were not configured with (a CDN a
    redirect names) must not resolve us into loopback, link-local or private space: that is
    how a hostile redirect reaches cloud metadata or the admin port of a neighbour."""
    if host.lower() in trusted_hosts:
        return addresses
    return [a for a in addresses if not is_private_address(a)]


def same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, *_origin(a)) == (b.scheme, *_origin(b))
