"""Pure: JSON a peer wrote (an upstream's manifests, tags lists and token answers; files on
disk another program wrote), where anything malformed is a :class:`ValueError`.

``json.loads`` raises ``RecursionError`` for nesting deeper than the interpreter's stack
(``[[[[...`` is enough, and a manifest may be 4 MiB of it): a ``RuntimeError`` that callers
catching ``ValueError`` for "not JSON" never saw, so a hostile upstream turned a pull into a
500. No document we read is nested more than a few levels, so here it is just malformed.
"""

from __future__ import annotations

import json
from typing import Any


class MalformedJson(ValueError):
    """Not JSON, or nested deeper than can be parsed."""


def loads(text: bytes | str) -> Any:
    """The document in ``text``; raises :class:`ValueError` (``UnicodeDecodeError``,
    ``json.JSONDecodeError`` or :class:`MalformedJson`) for anything that is not one."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MalformedJson("JSON nested too deeply") from None
