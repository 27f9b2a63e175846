"""Pure: the ``Link: <...>; rel="next"`` header of a paginated answer (tags lists, and the
referrers API), rewritten from upstream's URL to our own.

Only the paging parameters survive (``n``, ``last``, and whatever the endpoint names): the rest
of upstream's URL is its own business, and a header we send must not carry text upstream chose.
The client's own routing parameters (containerd's ``ns=``) are added back, or page 2 of a
listing would go to the default upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from yarl import URL

PAGING: Final = ("n", "last")
_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:+")


def next_target(link: str) -> URL | None:
    """The URL of the ``rel="next"`` entry of a Link header, or None."""
    for entry in link.split(","):
        target, _, params = entry.strip().partition(";")
        target = target.strip()
        if not (target.startswith("<") and target.endswith(">")):
            continue
        rels = {p.strip().replace(" ", "") for p in params.split(";")}
        if 'rel="next"' in rels or "rel=next" in rels:
            try:
                return URL(target[1:-1], encoded=True)
            except ValueError:
                return None
    return None


def next_link(
    link: str, our_path: str, routing: Mapping[str, str], paging: Iterable[str] = PAGING
) -> str | None:
    """Our ``Link`` header for upstream's ``link``: ``our_path`` with upstream's paging values
    and our ``routing`` parameters; None when there is no next page we can name safely."""
    target = next_target(link)
    if target is None:
        return None
    query: dict[str, str] = {}
    for name in paging:
        value = target.query.get(name)
        if value is not None:
            if not value or len(value) > 256 or not set(value) <= _SAFE:
                return None
            query[name] = value
    query.update(routing)
    return f'<{URL.build(path=our_path, query=query)}>; rel="next"'
