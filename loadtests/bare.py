"""A bare aiohttp server: one handler that answers every GET with the same bytes and headers.

The floor under what any aiohttp server can do per request on this machine: no routing beyond
aiohttp's own, no middleware, no logging, no validation. The manifest scenario gives it the exact
body and headers ocicache sends for a cached manifest, so that "ocicache / bare" is what
ocicache's own work per request costs.

Run as ``python -m loadtests.bare --body FILE --headers FILE.json``: it listens on an ephemeral
port of 127.0.0.1, prints ``listening PORT``, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web


def make_app(body: bytes, headers: dict[str, str]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


async def serve(body: bytes, headers: dict[str, str]) -> None:
    # As ocicache runs its app: no access log.
    runner = web.AppRunner(make_app(body, headers), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = runner.addresses[0][1]
        sys.stdout.write(f"listening {port}\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bare", description=__doc__.split("\n")[0])
    p.add_argument("--body", type=Path, required=True, help="the response body")
    p.add_argument("--headers", type=Path, required=True, help="a JSON object of response headers")
    ns = p.parse_args(argv)
    headers = json.loads(ns.headers.read_text())
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        p.error("--headers must hold a JSON object of strings")
    import uvloop

    # uvloop, as ocicache runs by default.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(ns.body.read_bytes(), headers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
