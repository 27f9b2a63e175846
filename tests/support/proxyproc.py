"""ocicache as a real process (`python -m proxy serve`), for tests that restart or kill it."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    url: str  # http://127.0.0.1:PORT, or https://
    banner: str  # the line it printed once listening
    # Its log (JSON lines on stderr), as parsed events, when started with logs=True.
    events: list[dict[str, Any]] = field(default_factory=list)
    _more: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host(self) -> str:
        return self.url.partition("://")[2]

    async def logged(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 60) -> None:
        """Wait until ``predicate(events so far)`` holds (woken by each new log line)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.events):
                self._more.clear()
                await self._more.wait()

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                self._more.set()
        self._more.set()


@asynccontextmanager
async def serving(
    cache: Path, upstreams: Mapping[str, str], *extra: str, logs: bool = False
) -> AsyncIterator[ProxyProcess]:
    """Start the proxy on a free loopback port; stop it gracefully (SIGTERM) on exit, unless
    the test has already ended it. ``logs``: read its info-level JSON log into ``events``."""
    level = "info" if logs else "warning"
    args = [
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        str(cache),
        "--log-level",
        level,
        "--log-format",
        "json",
    ]
    for name, url in upstreams.items():
        args += ["--upstream", f"{name}={url}"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        *args,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if logs else asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    reader: asyncio.Task[None] | None = None
    try:
        assert proc.stdout is not None
        # It prints where it listens once the socket is bound: no polling needed.
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        match = re.search(rb"listening on (https?://\S+)", line)
        assert match, line
        running = ProxyProcess(proc, match.group(1).decode(), line.decode())
        if logs:
            assert proc.stderr is not None
            reader = asyncio.create_task(running._read_log(proc.stderr))
        yield running
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if reader is not None:
            await reader
