"""Pure: decimal numbers from text a peer controls (headers, query strings).

``str.isdigit`` is true for characters ``int`` refuses ("²", Arabic-Indic digits), and ``int``
refuses more than 4,300 digits (CPython's guard against quadratic conversion): both turned a
hostile ``Range`` or ``?n=`` into a 500. Every count read from a client or an upstream goes
through :func:`parse_count`, which accepts ASCII digits only and saturates instead of raising.
"""

from __future__ import annotations

import re
from typing import Final

# Larger than any size or count we deal in, and small enough to convert in constant time.
CAP: Final = 10**18
_DIGITS: Final = re.compile(r"[0-9]+")


def parse_count(text: str) -> int | None:
    """The non-negative integer ``text`` spells in ASCII digits, at most :data:`CAP`; None if it
    is anything else (empty, signed, spaced, other scripts' digits)."""
    if not _DIGITS.fullmatch(text):
        return None
    significant = text.lstrip("0")
    if len(significant) > len(str(CAP)):
        return CAP
    return min(int(significant or "0"), CAP)
