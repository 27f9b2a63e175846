"""Pure: how far a range reader's bytes are from arriving, when a blob comes in parts."""

from __future__ import annotations

from proxy.flows.coverage import Coverage, plan_parts

MiB = 1024 * 1024


def chunked(size: int = 200 * MiB) -> Coverage:
    return Coverage(size, plan_parts(size, 8 * MiB, 8 * MiB))


def test_a_chunk_no_connection_took_is_no_front() -> None:
    # One connection working in order (a shared link), 1 MiB into the blob: a range at 150 MiB
    # lies in an untaken chunk that starts at 144 MiB, 6 MiB short of it, yet nothing is coming.
    coverage = chunked()
    coverage.parts[0].taken, coverage.parts[0].done = True, MiB
    assert coverage.part_at(150 * MiB) is not None and coverage.part_at(150 * MiB).start == 144 * MiB  # type: ignore[union-attr]
    assert coverage.far_from(150 * MiB, 8 * MiB)
    assert not coverage.far_from(5 * MiB, 8 * MiB)  # the working connection is 4 MiB short


def test_a_taken_chunk_brings_its_bytes_from_its_start() -> None:
    coverage = chunked()
    coverage.parts[0].taken, coverage.parts[0].done = True, MiB
    chunk = coverage.part_at(150 * MiB)
    assert chunk is not None
    chunk.taken = True
    assert not coverage.far_from(150 * MiB, 8 * MiB)  # 6 MiB from a connection on its way
    assert coverage.far_from(150 * MiB, 4 * MiB)


def test_the_front_is_the_nearest_one_below() -> None:
    coverage = chunked()
    for part in coverage.parts[:17]:  # 0-136 MiB taken; the 17th (128-136 MiB) half done
        part.taken, part.done = True, part.end - part.start
    coverage.parts[16].done = 4 * MiB
    assert not coverage.far_from(138 * MiB, 8 * MiB)  # 132 MiB reached: 6 MiB short
    assert coverage.far_from(150 * MiB, 8 * MiB)
    assert not Coverage.single(10 * MiB).far_from(20 * MiB, MiB)  # past the end: no part
