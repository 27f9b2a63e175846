"""Several ranges: coalesced, in order, unsatisfiable ones dropped; too many is the whole."""

from __future__ import annotations

import pytest

from proxy.core.errors import OciError
from proxy.core.ranges import MAX_RANGES, ByteRange, parse_ranges
from proxy.flows.coverage import MIN_PART, Coverage, Part, plan_parts


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-1,5-6", [ByteRange(0, 1), ByteRange(5, 6)]),
        ("bytes=5-6, 0-1", [ByteRange(0, 1), ByteRange(5, 6)]),
        ("bytes=0-10,5-20", [ByteRange(0, 20)]),
        ("bytes=0-4,5-9", [ByteRange(0, 9)]),  # touching: one part
        ("bytes=0-4,500-600", [ByteRange(0, 4)]),  # one past the end is dropped
        ("bytes=-10,0-0", [ByteRange(0, 0), ByteRange(90, 99)]),
        ("bytes=" + ",".join(f"{i}-{i}" for i in range(0, 2 * MAX_RANGES + 2, 2)), None),  # too many
    ],
)
def test_several_ranges(header: str, expected: list[ByteRange] | None) -> None:
    assert parse_ranges(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=500-600,700-", "bytes=0-1,x", "bytes=0-1,5-2"])
def test_no_satisfiable_or_a_malformed_range_is_416(header: str) -> None:
    with pytest.raises(OciError) as info:
        parse_ranges(header, 100)
    assert info.value.status == 416


def test_parts_are_the_first_chunk_then_chunks_in_order() -> None:
    mib = MIN_PART
    parts = plan_parts(10 * mib, 2 * mib, 3 * mib)
    assert [(p.start, p.end) for p in parts] == [
        (0, 2 * mib),
        (2 * mib, 5 * mib),
        (5 * mib, 8 * mib),
        (8 * mib, 10 * mib),
    ]
    # No crumb of a last chunk: it goes with the one before.
    parts = plan_parts(8 * mib + 1, 2 * mib, 3 * mib)
    assert [(p.start, p.end) for p in parts] == [(0, 2 * mib), (2 * mib, 5 * mib), (5 * mib, 8 * mib + 1)]
    assert [(p.start, p.end) for p in plan_parts(mib, 2 * mib, 3 * mib)] == [(0, mib)]


def test_coverage_prefix_and_runs() -> None:
    cov = Coverage(100, [Part(0, 10, 10), Part(10, 40, 5), Part(40, 70, 30), Part(70, 100, 3)])
    assert cov.prefix() == 15
    assert cov.filled_until(0) == 15
    assert cov.filled_until(12) == 15
    assert cov.filled_until(15) == 15  # the byte at 15 is not there yet
    assert cov.filled_until(45) == 73  # the third part is whole, the fourth has 3 bytes
    assert cov.far_from(30, 10) and not cov.far_from(20, 10)
