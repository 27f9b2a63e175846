"""Pure: which bytes of a blob a download has, when several parts of it arrive at once.

A cold blob above a threshold is fetched as several ranged GETs at once, each writing its part
of the one temp file at its offset (CDNs and long links cap each TCP stream; several streams
multiply what one link carries). The first request asks for the first chunk only; its answer
names the blob's size, and the rest is cut into chunks that the connections take in order
(:func:`plan_parts`). A registry that ignores ``Range`` answers the whole blob to that first
request, and the download is one stream, as before.

:class:`Coverage` tracks the parts: the contiguous prefix (what the hash has to follow in
order, and what a whole-body reader may tail) and, for a range reader, how far the bytes from
its offset are already there (a part further on may have them long before the prefix does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

# No part smaller than this: a request costs a round trip (and maybe a token and a redirect).
MIN_PART: Final = 1024 * 1024


@dataclass(slots=True)
class Part:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written from start
    taken: bool = False  # a connection is on it, or was: its bytes are coming from its start

    @property
    def reached(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.reached >= self.end

    @property
    def started(self) -> bool:
        """Bytes of it are coming: a connection took it, or some arrived."""
        return self.taken or self.done > 0


def plan_parts(size: int, first_end: int, chunk: int) -> list[Part]:
    """Parts for a blob of ``size`` whose first ``first_end`` bytes are already asked for:
    that part, then chunks of ``chunk`` bytes in order. The connections take the next chunk as
    they finish one, so they all work near the contiguous prefix, which then grows at what they
    carry together: whole-body readers, who can only be sent the prefix, gain as much as the
    download does (behind a shared link, contiguous quarters would have made the prefix grow at
    a quarter of the link's rate)."""
    parts = [Part(0, min(first_end, size))]
    start = parts[0].end
    step = max(MIN_PART, chunk)
    while start < size:
        end = min(size, start + step)
        if size - end < MIN_PART // 2:
            end = size  # no crumb of a last chunk
        parts.append(Part(start, end))
        start = end
    return parts


@dataclass
class Coverage:
    size: int
    parts: list[Part] = field(default_factory=list)

    @classmethod
    def single(cls, size: int) -> Coverage:
        return cls(size, [Part(0, size)])

    def prefix(self) -> int:
        """Bytes from 0 that are all there."""
        for part in self.parts:
            if not part.complete:
                return part.reached
        return self.size

    def part_at(self, pos: int) -> Part | None:
        for part in self.parts:
            if part.start <= pos < part.end:
                return part
        return None

    def filled_until(self, pos: int) -> int:
        """The end of the run of bytes present from ``pos`` (``pos`` itself if none)."""
        end = pos
        for part in self.parts:
            if part.end <= end:
                continue
            if part.start > end or part.reached <= end:
                break
            end = part.reached
        return end

    def far_from(self, pos: int, gap: int) -> bool:
        """Will the bytes at ``pos`` take long to come? Yes if the nearest front of bytes
        arriving at or before ``pos`` is more than ``gap`` short of it. A part no connection has
        taken yet brings nothing until the connections, which take chunks in order, get to it:
        its start is no front (behind a shared link one connection works through them all)."""
        part = self.part_at(pos)
        if part is None:
            return False
        if part.started:
            return pos - part.reached > gap
        front = max((p.reached for p in self.parts if p.started and p.start <= pos), default=0)
        return pos - front > gap

    @property
    def complete(self) -> bool:
        return all(p.complete for p in self.parts)
