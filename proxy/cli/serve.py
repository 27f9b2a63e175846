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
from proxy.core.authconfig import TlsConfig
from proxy.core.config import Settings
from proxy.core.configvalues import ConfigError
from proxy.web import tls
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
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    s.add_argument("--log-format", choices=("json", "console"), help="default json")
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
    app = create_app(settings)
    runner = AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, settings.listen_host, settings.listen_port, backlog=1024, ssl_context=ssl_context
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
    for host, port, *_ in runner.addresses:
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        log.info(
            "listening",
            url=f"{scheme}://{shown}:{port}",
            cache_dir=str(settings.cache_dir),
            offline=settings.offline,
            upstreams={u.name: u.url for u in settings.upstreams},
        )
        mode = ", offline: no upstream is contacted" if settings.offline else ""
        print(
            f"ocicache listening on {scheme}://{shown}:{port} (cache: {settings.cache_dir}{mode})", flush=True
        )
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await runner.cleanup()
