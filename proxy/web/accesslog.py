"""The access log: one line per answered request, written by the app's one middleware.

Through structlog it costs about a quarter of a warm manifest answer (a lazy logger bound per
call, five processors, ``print`` with a flush: one system call per request). When ``serve``
logs JSON lines at info, the request line takes a shorter way that writes the same line:
the same keys and values, a timestamp in the same form, rendered by ``json.dumps`` and
written in batches per turn of the event loop, so that the requests a turn answered share
a few system calls (one per PIPE_BUF bytes of lines). Everything else, and every line when the console
format or a test's ``capture_logs`` is in use, goes through structlog as before.

A kill -9 loses at most the lines of the turn it interrupts; a clean stop flushes. Each write
is whole lines of at most PIPE_BUF bytes, so the processes of ``serve --workers`` sharing one
stderr pipe never cut into each other's lines.
"""

from __future__ import annotations

import asyncio
import json
import select
import sys
import time
from collections.abc import Callable
from typing import Any, Final, Protocol, TextIO

import structlog

EVENT: Final = "request"
# Past this many characters waiting, write now rather than at the end of the turn.
BATCH_MAX: Final = 64 * 1024
# What one write to a pipe puts in at once, not interleaved with another process's.
PIPE_BUF: Final = select.PIPE_BUF

_log = structlog.get_logger("ocicache.access")


class AccessLog(Protocol):
    def write(self, fields: dict[str, Any]) -> None:
        """One answered request's fields (method, path, status, bytes, cache, ...)."""

    def flush(self) -> None: ...


class ThroughStructlog:
    """The default: the request event goes through structlog's configured processors."""

    def write(self, fields: dict[str, Any]) -> None:
        _log.info(EVENT, **fields)

    def flush(self) -> None:
        pass


class _Clock:
    """``TimeStamper(fmt="iso", utc=True)``'s form, with the formatted second kept."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        t = time.time()
        second = int(t)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((t - second) * 1_000_000):06d}Z"


class JsonLines:
    """The request line as structlog's JSON renderer writes it, batched per loop turn."""

    def __init__(self, stream: Callable[[], TextIO] = lambda: sys.stderr) -> None:
        self._stream = stream  # looked up at write time: daemons and tests swap sys.stderr
        self._clock = _Clock()
        self._pending: list[str] = []
        self._size = 0
        self._scheduled = False
        self._dumps = json.JSONEncoder(default=repr).encode

    def write(self, fields: dict[str, Any]) -> None:
        fields["event"] = EVENT
        fields["level"] = "info"
        fields["timestamp"] = self._clock.now()
        line = self._dumps(fields)
        self._pending.append(line)
        self._size += len(line)
        if self._size >= BATCH_MAX:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        pieces = pipe_sized(self._pending)
        self._pending = []
        self._size = 0
        stream = self._stream()
        try:
            for text in pieces:
                stream.write(text)
                stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr loses log lines, never the requests they describe


def pipe_sized(lines: list[str], limit: int = PIPE_BUF) -> list[str]:
    """``lines`` joined into writes of at most ``limit`` bytes, each of whole lines (a longer
    line alone). Several processes share one stderr with ``serve --workers``: a pipe writes
    up to PIPE_BUF bytes at once, so lines never interleave mid-line."""
    pieces: list[str] = []
    batch: list[str] = []
    size = 0
    for line in lines:
        n = len(line.encode()) + 1 if not line.isascii() else len(line) + 1
        if batch and size + n > limit:
            pieces.append("\n".join(batch) + "\n")
            batch, size = [], 0
        batch.append(line)
        size += n
    if batch:
        pieces.append("\n".join(batch) + "\n")
    return pieces
