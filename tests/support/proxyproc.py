"""ocicache as a real process (`python -m proxy serve`), for tests that restart or kill it."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    url: str  # http://127.0.0.1:PORT, or https://

    @property
    def host(self) -> str:
        return self.url.partition("://")[2]


@asynccontextmanager
async def serving(cache: Path, upstreams: Mapping[str, str], *extra: str) -> AsyncIterator[ProxyProcess]:
    """Start the proxy on a free loopback port; stop it gracefully (SIGTERM) on exit, unless
    the test has already ended it."""
    args = ["--listen", "127.0.0.1:0", "--cache-dir", str(cache), "--log-level", "warning"]
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
        stderr=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        # It prints where it listens once the socket is bound: no polling needed.
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        match = re.search(rb"listening on (https?://\S+)", line)
        assert match, line
        yield ProxyProcess(proc, match.group(1).decode())
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
