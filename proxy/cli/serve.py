"""``ocicache serve``: run the proxy."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from pathlib import Path

import structlog
from aiohttp import web

from proxy.cli.common import UPSTREAM_HELP
from proxy.cli.logs import access_log
from proxy.core import listenaddr
from proxy.core.authconfig import TlsConfig
from proxy.core.clusterconfig import advertised
from proxy.core.config import Settings
from proxy.core.configvalues import ConfigError
from proxy.core.effective import effective
from proxy.web import keys, tls
from proxy.web.app import create_app
from proxy.web.runner import AppRunner

log = structlog.get_logger("ocicache")


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

        uvloop.run(serve(settings, ssl_context))
    else:
        asyncio.run(serve(settings, ssl_context))
    return 0


async def reload_tls(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    """SIGHUP: the renewed certificate for new connections; open ones keep theirs."""
    try:
        await asyncio.to_thread(tls.check, cfg)
        tls.reload(ctx, cfg)
    except ConfigError as exc:
        log.error("tls_reload_failed", error=str(exc), kept="previous certificate")
        print(f"ocicache: TLS reload failed, still serving the previous certificate: {exc}", flush=True)
        return
    log.info("tls_reloaded", cert=str(cfg.cert))
    print(f"ocicache: reloaded TLS certificate {cfg.cert}", flush=True)


async def serve(settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
    app = create_app(settings, access=access_log())
    log.info("settings", **effective(settings))
    runner = AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.listen_host, settings.listen_port, backlog=1024, ssl_context=ssl_context
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        app[keys.LIFECYCLE].stopping = True  # /readyz says so at once
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        if ssl_context is None or settings.tls is None:
            log.info("sighup_ignored", reason="no tls: configured; credential files reload by themselves")
            return
        task = loop.create_task(reload_tls(ssl_context, settings.tls))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    scheme = "https" if ssl_context is not None else "http"
    cluster = app.get(keys.CLUSTER)
    if cluster is not None and settings.cluster.advertise is None and runner.addresses:
        # The port is known only now (--listen :0).
        host, port, *_ = runner.addresses[0]
        cluster.advertise(advertised(settings.cluster, host, port, tls=ssl_context is not None))
    for host, port, *_ in runner.addresses:
        where = listenaddr.describe(scheme, host, port)
        log.info(
            "listening",
            url=listenaddr.url(scheme, host, port),
            all_interfaces=listenaddr.all_interfaces(host),
            advertise=None if cluster is None else cluster.me,
            cache_dir=str(settings.cache_dir),
            offline=settings.offline,
        )
        mode = ", offline: no upstream is contacted" if settings.offline else ""
        print(f"ocicache listening on {where} (cache: {settings.cache_dir}{mode})", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await runner.cleanup()
