"""JSON a peer wrote: anything that is not a document is a ValueError, however it fails."""

from __future__ import annotations

import pytest

from proxy.core import jsontext


@pytest.mark.parametrize(
    "text",
    [b"", b"{", b"\xff\xfe", b"[" * 100_000, b'{"a":' * 100_000, "[" * 100_000, b"NaN-ish"],
)
def test_anything_but_a_document_is_a_value_error(text: bytes | str) -> None:
    with pytest.raises(ValueError):
        jsontext.loads(text)


def test_a_document_is_read() -> None:
    assert jsontext.loads(b'{"tags": ["a"], "n": [[1]]}') == {"tags": ["a"], "n": [[1]]}
