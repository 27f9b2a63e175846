"""The memory window of a download the disk could not take."""

from __future__ import annotations

import asyncio

import pytest

from proxy.flows.window import Cut, Window


async def test_readers_take_in_turn_and_the_window_forgets_what_all_have() -> None:
    w = Window(100, limit=10)
    w.join(1, 0)  # still reading the file part
    w.join(2, 100)
    await w.append(b"abcde")
    assert w.take(2, 100, 105) == b"abcde"
    await w.append(b"fgh")
    assert w.start == 100  # reader 1 has taken nothing of the window yet
    assert w.take(1, 100, 108) == b"abcdefgh"
    await w.append(b"ij")
    assert w.start == 105  # reader 2 is at 105, reader 1 at 108


async def test_a_full_window_waits_for_the_slowest_then_cuts_it() -> None:
    w = Window(0, limit=4, stall=0.01)
    w.join(1, 0)
    w.join(2, 0)
    await w.append(b"abcd")
    assert w.take(1, 0, 4) == b"abcd"
    # Reader 2 takes nothing: the producer waits its stall limit, then cuts it off.
    await w.append(b"efgh")
    with pytest.raises(Cut):
        w.take(2, 0, 4)
    assert w.take(1, 4, 8) == b"efgh"


async def test_a_reader_arriving_after_bytes_were_let_go_is_refused() -> None:
    w = Window(0, limit=4)
    w.join(1, 0)
    await w.append(b"abcd")
    w.take(1, 0, 4)
    await w.append(b"e")
    with pytest.raises(Cut):
        w.join(2, 0)
    w.join(3, 4)  # from where the window still holds: fine
    waiting = asyncio.create_task(w.append(b"fghi"))
    w.take(1, 4, 5)
    w.take(3, 4, 5)
    await waiting
