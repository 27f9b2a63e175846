"""Pure: the byte ranges a ``Range`` header asks of a blob of known size (RFC 9110 14).

One range is answered 206 with that range; several, 206 ``multipart/byteranges`` (lazy pullers
such as SOCI ask for several at once), after coalescing those that overlap or touch (RFC 9110
14.6 allows it, in any order). A range that starts past the end is dropped; if none is left, or
the header is malformed, the answer is 416 (``Content-Range: bytes */size``), which is what
registries answer and what clients resuming a download expect. A unit other than bytes, or
more ranges than :data:`MAX_RANGES`, is answered with the whole body, which 14.2 allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError

MAX_RANGES: Final = 64


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Inclusive ``first``..``last``, as in RFC 9110 14.1.1."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def end(self) -> int:
        return self.last + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"


def parse_ranges(header: str | None, size: int) -> list[ByteRange] | None:
    """The ranges a ``Range`` header asks for, coalesced and in order; None for the whole body."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",")]
    if len(specs) > MAX_RANGES:
        return None
    bad = OciError(
        Code.RANGE_INVALID,
        "requested range not satisfiable",
        {"range": header[:100], "size": size},
        headers={"Content-Range": f"bytes */{size}"},
    )
    wanted: list[ByteRange] = []
    for one in specs:
        try:
            rng = _one(one, size)
        except ValueError:
            raise bad from None
        if rng is not None:
            wanted.append(rng)
    if not wanted:
        raise bad
    return _coalesced(wanted)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single range a header asks for; None for the whole body (several ranges included)."""
    ranges = parse_ranges(header, size)
    return ranges[0] if ranges is not None and len(ranges) == 1 else None


def _one(spec: str, size: int) -> ByteRange | None:
    """One range-spec: a range, or None if it is unsatisfiable (past the end); ValueError if
    it is malformed."""
    first_s, dash, last_s = spec.partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    first = parse_count(first_s) if first_s else None
    last = parse_count(last_s) if last_s else None
    if not dash or (first_s and first is None) or (last_s and last is None):
        raise ValueError(spec)
    if first is None:
        # Suffix form "-N": the last N bytes.
        if last is None:
            raise ValueError(spec)
        if last == 0 or size == 0:
            return None
        return ByteRange(max(0, size - last), size - 1)
    if last is not None and last < first:
        raise ValueError(spec)
    if first >= size:
        return None
    return ByteRange(first, size - 1 if last is None else min(last, size - 1))


def _coalesced(ranges: list[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for rng in sorted(ranges, key=lambda r: r.first):
        if merged and rng.first <= merged[-1].last + 1:
            merged[-1] = ByteRange(merged[-1].first, max(merged[-1].last, rng.last))
        else:
            merged.append(rng)
    return merged
