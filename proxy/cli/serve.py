"""``ocicache serve``: run the proxy."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import ssl
import tempfile
from pathlib import Path

import structlog
from aiohttp import web

from proxy.cli.common import UPSTREAM_HELP
from proxy.cli.logs import access_log
from proxy.core import listenaddr
from proxy.core.clusterconfig import advertised
from proxy.core.config import Settings
from proxy.core.effective import effective
from proxy.web import keys, tls
from proxy.web.app import create_app
from proxy.web.runner import AppRunner
from proxy.workers.supervisor import Supervisor

log = structlog.get_logger("ocicache")

# Connections the workers' relays may open at once before the primary accepts them (the
# kernel caps it at net.core.somaxconn, 4096 by default).
RELAY_BACKLOG = 4096


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Settings: flags > OCICACHE_* environment > --config file > defaults.",
    )
    s.add_argument("--config", type=Path, help="YAML config file (see config/ocicache.example.yaml)")
    s.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    s.add_argument("--cache-dir", metavar="DIR", help="cache directory (default ~/.cache/ocicache)")
    s.add_argument("--upstream", metavar="NAME=URL", action="append", help=UPSTREAM_HELP)
    s.add_argument("--tag-ttl", metavar="SECONDS", help="how long a tag's digest is trusted (default 60)")
    s.add_argument(
        "--max-cache-size", metavar="SIZE", help="disk budget for blobs, e.g. 50GiB (default 20GiB)"
    )
    s.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="never connect to any upstream: serve what the cache holds, whatever its age",
    )
    s.add_argument(
        "--redis",
        metavar="URL",
        help="share state with other replicas through this Redis (redis://, rediss://, unix://); "
        "needs cluster.token_env",
    )
    s.add_argument(
        "--advertise",
        metavar="URL",
        help="the URL other replicas reach this one at (default: from --listen)",
    )
    s.add_argument(
        "--workers",
        metavar="N",
        help="processes serving the port (SO_REUSEPORT): one owns the cache, N-1 answer warm "
        "requests and relay the rest to it (default auto: one per CPU, at most 8)",
    )
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    s.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        help="default auto: console when stderr is a terminal, else JSON lines",
    )
    s.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop implementation (default uvloop)",
    )


def run(settings: Settings, ns: argparse.Namespace) -> int:
    ssl_context = tls.server_context(settings.tls) if settings.tls is not None else None
    if ns.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(settings, ssl_context, event_loop=ns.event_loop))
    else:
        asyncio.run(serve(settings, ssl_context, event_loop=ns.event_loop))
    return 0


async def _refuse_taken_port(host: str, port: int) -> None:
    """OSError (address in use) if a socket already listens on ``host:port``."""
    loop = asyncio.get_running_loop()
    probe = await loop.create_server(asyncio.Protocol, host, port, reuse_port=False)
    probe.close()
    await probe.wait_closed()


async def serve(
    settings: Settings, ssl_context: ssl.SSLContext | None = None, *, event_loop: str = "asyncio"
) -> None:
    several = settings.processes > 1
    if several and settings.listen_port:
        # SO_REUSEPORT would let us share a port another server of this user already holds,
        # silently splitting its clients with it: make sure nobody does first.
        await _refuse_taken_port(settings.listen_host, settings.listen_port)
    app = create_app(settings, access=access_log())
    log.info("settings", **effective(settings))
    runner = AppRunner(app, access_log=None, handle_signals=False, processes=settings.processes)
    supervisor: Supervisor | None = None
    # Only this user may enter the directory, so only our workers reach the socket in it.
    relay_dir = tempfile.mkdtemp(prefix="ocicache-") if several else None
    if relay_dir is not None:
        metrics = app[keys.METRICS]

        def gone(index: int) -> None:
            metrics.worker_connections.pop(index, None)  # its last report is stale

        socket_path = os.path.join(relay_dir, "primary.sock")
        supervisor = Supervisor(settings, socket_path, event_loop, app[keys.WORKER_SECRET], on_exit=gone)
    # Until it listens (then _until_stopped's handlers take over), SIGINT and SIGTERM stop the
    # start-up where it is, and the clean-up below still runs: the workers, the directory.
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    stopped_starting = False

    def stop_starting() -> None:
        nonlocal stopped_starting
        stopped_starting = True
        if starting is not None:
            starting.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_starting)
    try:
        if supervisor is not None:
            await supervisor.spawn()  # they import while this process loads its catalogue
            log.info("workers_spawned", pids=supervisor.spawned_pids)
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.listen_host,
            settings.listen_port,
            backlog=1024,
            ssl_context=ssl_context,
            reuse_port=several or None,
        )
        await site.start()
        if supervisor is not None and relay_dir is not None:
            # A Unix socket refuses (EAGAIN) past its backlog where TCP would queue: room
            # for every relay a burst of clients opens at once.
            relay_socket = os.path.join(relay_dir, "primary.sock")
            await web.UnixSite(runner, relay_socket, backlog=RELAY_BACKLOG).start()
            await supervisor.start(next(a[1] for a in runner.addresses if isinstance(a, tuple)))
        await _until_stopped(settings, app, runner, ssl_context, supervisor, relay_dir)
    except asyncio.CancelledError:
        if not stopped_starting:
            raise
        log.info("stopped_while_starting")
    finally:
        log.info("stopping")
        if supervisor is not None:
            await supervisor.stop()  # first: what they relay still finds this process
        await runner.cleanup()
        if relay_dir is not None:
            shutil.rmtree(relay_dir, ignore_errors=True)


async def _until_stopped(
    settings: Settings,
    app: web.Application,
    runner: AppRunner,
    ssl_context: ssl.SSLContext | None,
    supervisor: Supervisor | None,
    relay_dir: str | None,
) -> None:
    """Say where it listens, then serve until SIGINT or SIGTERM (SIGHUP reloads TLS)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        app[keys.LIFECYCLE].stopping = True  # /readyz says so at once
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        if supervisor is not None:
            supervisor.signal(signal.SIGHUP)
        if ssl_context is None or settings.tls is None:
            log.info("sighup_ignored", reason="no tls: configured; credential files reload by themselves")
            return
        task = loop.create_task(tls.reload_logged(ssl_context, settings.tls))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    scheme = "https" if ssl_context is not None else "http"
    cluster = app.get(keys.CLUSTER)
    listening = [a for a in runner.addresses if isinstance(a, tuple)]  # not the workers' socket
    if cluster is not None and settings.cluster.advertise is None and listening:
        # The port is known only now (--listen :0).
        host, port, *_ = listening[0]
        cluster.advertise(advertised(settings.cluster, host, port, tls=ssl_context is not None))
    for host, port, *_ in listening:
        where = listenaddr.describe(scheme, host, port)
        log.info(
            "listening",
            url=listenaddr.url(scheme, host, port),
            all_interfaces=listenaddr.all_interfaces(host),
            advertise=None if cluster is None else cluster.me,
            cache_dir=str(settings.cache_dir),
            offline=settings.offline,
            workers=settings.processes,
            worker_pids=[] if supervisor is None else supervisor.pids,
            workers_socket=None if relay_dir is None else os.path.join(relay_dir, "primary.sock"),
        )
        mode = ", offline: no upstream is contacted" if settings.offline else ""
        if supervisor is not None:
            mode += f", {settings.processes} processes"
        print(f"ocicache listening on {where} (cache: {settings.cache_dir}{mode})", flush=True)
    await stop.wait()
