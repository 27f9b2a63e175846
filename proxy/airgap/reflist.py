"""Pure: the image references a command is given, from its arguments and ``--file`` lists.

A list has one reference per line; ``#`` starts a comment (references never hold one), and
blank lines are skipped. Every reference is resolved to a configured upstream; all that cannot
be are reported together, each naming why (an unconfigured registry names it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.core.imageref import BadReference, ImageRef, parse_image_reference


def read_list(text: str) -> list[str]:
    found = []
    for line in text.splitlines():
        line = line.partition("#")[0].strip()
        if line:
            found.append(line)
    return found


def resolve(texts: Iterable[str], upstreams: Sequence[str]) -> tuple[list[ImageRef], list[str]]:
    """The references, without repeats, in order; and one message per one that is no good."""
    refs: dict[ImageRef, None] = {}
    errors = []
    for text in texts:
        try:
            refs[parse_image_reference(text, upstreams, upstreams[0])] = None
        except BadReference as exc:
            errors.append(str(exc))
    return list(refs), errors
