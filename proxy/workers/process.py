"""A front worker process: ``python -m proxy.workers``, started by the primary.

Its orders arrive on stdin, pickled (the primary's own settings, exactly as it parsed them,
and where to listen and relay); stdin then stays open, and its end means the primary is
gone, however it went (a kill -9 included): the worker stops taking connections, finishes
what it has under way, and exits. It writes one line to stdout once it listens.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import ssl
import struct
import sys
from dataclasses import dataclass
from typing import BinaryIO, Final

import structlog
from aiohttp import web

from proxy.cli.logs import access_log, configure
from proxy.core.config import Settings
from proxy.web import tls
from proxy.web.runner import AppRunner
from proxy.workers import front

log = structlog.get_logger("ocicache.worker")

READY: Final = b"ready\n"
_LENGTH: Final = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class Orders:
    settings: Settings
    socket_path: str  # the primary's Unix socket
    port: int  # the port the primary bound (--listen :0 is known only then)
    index: int  # 1..workers-1, for the logs
    secret: str  # what the primary takes this run's reports with
    event_loop: str  # uvloop or asyncio


def encode(orders: Orders) -> bytes:
    data = pickle.dumps(orders)
    return _LENGTH.pack(len(data)) + data


class NoOrders(Exception):
    """Stdin ended before the orders came: the primary is gone (or this was not started by
    it)."""


def decode(stream: BinaryIO) -> Orders:
    head = stream.read(_LENGTH.size)
    if len(head) != _LENGTH.size:
        raise NoOrders
    (length,) = _LENGTH.unpack(head)
    # Written by our own parent on a pipe only it holds: trusted as the parent is.
    orders = pickle.loads(stream.read(length))
    if not isinstance(orders, Orders):
        raise SystemExit("ocicache worker: not orders")
    return orders


async def serve(orders: Orders) -> None:
    settings = orders.settings
    ssl_context: ssl.SSLContext | None = None
    if settings.tls is not None:
        ssl_context = tls.server_context(settings.tls)
    app = front.create_app(settings, orders.socket_path, access_log(), orders.index, orders.secret)
    runner = AppRunner(app, access_log=None, handle_signals=False, processes=settings.processes)
    await runner.setup()
    app[front.FRONT].runner = runner
    site = web.TCPSite(
        runner, settings.listen_host, orders.port, backlog=1024, ssl_context=ssl_context, reuse_port=True
    )
    await site.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ssl_context is not None and settings.tls is not None:
        cfg, ctx = settings.tls, ssl_context
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(tls.reload_logged(ctx, cfg))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    # The primary's end of stdin: read until it closes.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    gone = loop.create_task(reader.read(), name="primary watch")
    gone.add_done_callback(lambda _: stop.set())
    log.info("worker_listening", index=orders.index, port=orders.port)
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    # Nobody reads the pipe from here on: what is printed later goes with the logs.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        await stop.wait()
    finally:
        primary_gone = gone.done()
        log.info("worker_stopping", index=orders.index, primary_gone=primary_gone)
        gone.cancel()
        await runner.cleanup()
        if primary_gone:
            # It could not remove its socket's directory (killed): the first worker out does.
            _remove_relay_dir(os.path.dirname(orders.socket_path))


def _remove_relay_dir(path: str) -> None:
    if os.path.basename(path).startswith("ocicache-"):  # ours, made by mkdtemp: nothing else
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    # Until the loop's own handler is in place, a reload (SIGHUP) must not end this process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Everything is imported by now (this module's imports, and uvloop's): the orders come
    # once the primary listens, and the worker then only binds and says it is ready.
    import uvloop

    relay_dir = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        orders = decode(sys.stdin.buffer)
    except NoOrders:
        if relay_dir is None:
            raise SystemExit(
                "ocicache worker: no orders on stdin (it is started by serve --workers)"
            ) from None
        # The primary died while starting (a kill -9): nobody else will remove its directory.
        _remove_relay_dir(relay_dir)
        return
    configure(orders.settings.log_level, orders.settings.log_format)
    structlog.contextvars.bind_contextvars(worker=orders.index)
    if orders.event_loop == "uvloop":
        uvloop.run(serve(orders))
    else:
        asyncio.run(serve(orders))
