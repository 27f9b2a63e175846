"""Counts read from text a peer controls never raise, whatever they hold."""

from __future__ import annotations

import pytest

from proxy.core.digits import CAP, parse_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("007", 7),
        ("123456", 123456),
        ("9" * 5000, CAP),
        ("0" * 5000 + "12", 12),
        ("", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1.5", None),
        ("\u00b2", None),  # isdigit() says yes, int() says no
        ("\u0663", None),  # ARABIC-INDIC DIGIT THREE
        ("1e9", None),
    ],
)
def test_parse_count(text: str, expected: int | None) -> None:
    assert parse_count(text) == expected
