"""In-memory samples of the request counters, for the status page's last hour and its chart.

A task the app owns reads the counters every ``SAMPLE_EVERY`` seconds (nothing is added per
request); an hour of samples is kept. Rates over a window are differences between two samples;
the chart is requests per minute, split into those answered from the cache and the rest,
drawn as bars whose geometry is computed here (pure) and drawn by the template as inline SVG.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

SAMPLE_EVERY: Final = 10.0
KEEP_SECONDS: Final = 3600.0
CHART_MINUTES: Final = 30
CHART_WIDTH: Final = 600
CHART_HEIGHT: Final = 120


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall-clock time
    cached_requests: float
    requests: float  # with a cache result: cached and fetched upstream
    cached_bytes: float
    bytes: float
    upstream_bytes: float


@dataclass(frozen=True, slots=True)
class Minute:
    start: float
    cached: float
    other: float


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    width: float
    cached_y: float
    cached_height: float
    other_y: float
    other_height: float
    title: str


class Samples:
    def __init__(self, every: float = SAMPLE_EVERY, keep: float = KEEP_SECONDS) -> None:
        self.every = every
        self._samples: deque[Sample] = deque(maxlen=int(keep / every) + 2)

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)

    def all(self) -> list[Sample]:
        return list(self._samples)


def ratio(part: float, whole: float) -> float | None:
    return None if whole <= 0 else part / whole


def at_or_before(samples: Sequence[Sample], when: float) -> Sample | None:
    """The latest sample taken at or before ``when``."""
    times = [s.at for s in samples]
    i = bisect.bisect_right(times, when)
    return samples[i - 1] if i else None


def window(samples: Sequence[Sample], now: Sample, seconds: float) -> tuple[float, float, float, float]:
    """Cached requests, requests, cached bytes and bytes over the last ``seconds`` (or since
    the first sample, if the process is younger)."""
    start = at_or_before(samples, now.at - seconds) or (samples[0] if samples else None)
    if start is None:
        return now.cached_requests, now.requests, now.cached_bytes, now.bytes
    return (
        now.cached_requests - start.cached_requests,
        now.requests - start.requests,
        now.cached_bytes - start.cached_bytes,
        now.bytes - start.bytes,
    )


def per_minute(samples: Sequence[Sample], now: Sample, minutes: int = CHART_MINUTES) -> list[Minute]:
    """Requests in each of the last ``minutes`` minutes, oldest first; 0 before the first sample."""
    points = [*samples, now]
    out = []
    for k in range(minutes):
        start, end = now.at - (minutes - k) * 60, now.at - (minutes - k - 1) * 60
        a, b = at_or_before(points, start), at_or_before(points, end)
        if b is None:
            out.append(Minute(start, 0.0, 0.0))
            continue
        base_cached = a.cached_requests if a is not None else 0.0
        base_all = a.requests if a is not None else 0.0
        cached = max(0.0, b.cached_requests - base_cached)
        everything = max(0.0, b.requests - base_all)
        out.append(Minute(start, cached, max(0.0, everything - cached)))
    return out


def bars(minutes: Sequence[Minute], width: int = CHART_WIDTH, height: int = CHART_HEIGHT) -> list[Bar]:
    """Stacked bars: the cached part at the bottom, the rest above it."""
    if not minutes:
        return []
    top = max((m.cached + m.other for m in minutes), default=0.0) or 1.0
    step = width / len(minutes)
    out = []
    for i, m in enumerate(minutes):
        cached_h = height * m.cached / top
        other_h = height * m.other / top
        ago = len(minutes) - i
        out.append(
            Bar(
                x=round(i * step + 1, 2),
                width=round(max(step - 2, 1), 2),
                cached_y=round(height - cached_h, 2),
                cached_height=round(cached_h, 2),
                other_y=round(height - cached_h - other_h, 2),
                other_height=round(other_h, 2),
                title=f"{ago} min ago: {int(m.cached)} from cache, {int(m.other)} upstream",
            )
        )
    return out
