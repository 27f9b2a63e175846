"""Pure: where the server listens, said the way a person can use it.

``0.0.0.0`` is every IPv4 interface, not 127.0.0.1; ``::`` is every IPv6 interface (asyncio and
uvloop set ``IPV6_V6ONLY`` on the socket, so not IPv4 as well); an IPv6 address in a URL goes
in brackets (``http://[::1]:5000``, not ``http://::1:5000``).
"""

from __future__ import annotations

from typing import Final

_ALL_V4: Final = frozenset({"0.0.0.0", ""})
_ALL_V6: Final = frozenset({"::", "::0", "0:0:0:0:0:0:0:0"})


def url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, with an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def describe(scheme: str, host: str, port: int) -> str:
    """What the banner says after "listening on": a URL, or which interfaces and a URL that
    works from this machine."""
    if host in _ALL_V4:
        return f"all IPv4 interfaces, port {port} (from this host: {url(scheme, '127.0.0.1', port)})"
    if host in _ALL_V6:
        return f"all IPv6 interfaces, port {port} (from this host: {url(scheme, '::1', port)})"
    return url(scheme, host, port)


def all_interfaces(host: str) -> bool:
    return host in _ALL_V4 or host in _ALL_V6
