"""Pure: the address a client used to reach us, from its ``Host`` header, when it is safe to
write into a configuration file or a challenge."""

from __future__ import annotations

import re
from typing import Final

# host[:port]: a DNS name or IPv4 address, or a bracketed IPv6 literal. Nothing else, so a
# client-supplied Host header can never put a quote, newline or path into a generated file.
_HOST: Final = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])(?::(?P<port>[0-9]{1,5}))?",
    # ASCII: under Unicode case folding [a-z] also matches "İ", "ı" and the Kelvin sign, and
    # "İ".lower() is "i" plus a combining dot: not a name any resolver or TOML key expects.
    re.IGNORECASE | re.ASCII,
)


def proxy_address(host_header: str | None, fallback: str) -> str:
    """The address a client used to reach us, if its Host header is a plain ``host[:port]``."""
    match = _HOST.fullmatch(host_header or "")
    if match is None or (match["port"] is not None and not 0 < int(match["port"]) < 65536):
        return fallback
    return match[0].lower()
