"""``python -m proxy serve ...`` (also installed as ``ocicache``): flags, config, run."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from proxy import __version__
from proxy.cli.logs import configure
from proxy.core.authconfig import TlsConfig
from proxy.core.clusterconfig import advertised
from proxy.core.config import Settings, load
from proxy.core.configvalues import ConfigError
from proxy.store.lock import CacheBusy, CacheLock
from proxy.store.storage import Storage
from proxy.store.verify import verify
from proxy.web import keys, tls
from proxy.web.app import create_app
from proxy.web.runner import AppRunner

log = structlog.get_logger("ocicache")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocicache",
        description="A pull-through caching proxy for OCI container registries.",
    )
    p.add_argument("--version", action="version", version=f"ocicache {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Settings: flags > OCICACHE_* environment > --config file > defaults.",
    )
    s.add_argument("--config", type=Path, help="YAML config file (see config/ocicache.example.yaml)")
    s.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:5000)")
    s.add_argument("--cache-dir", metavar="DIR", help="cache directory (default ~/.cache/ocicache)")
    s.add_argument(
        "--upstream",
        metavar="NAME=URL",
        action="append",
        help="registry clients call NAME, reached at URL; repeatable; the first is the default "
        "for requests that name no registry. Replaces the built-in list (Docker Hub, ghcr.io, "
        "quay.io, registry.k8s.io, gcr.io, public.ecr.aws, mcr.microsoft.com)",
    )
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
    s.add_argument("--log-format", choices=("json", "console"), help="default json")
    s.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop implementation (default uvloop)",
    )
    v = sub.add_parser(
        "verify",
        help="rehash every cached blob; remove those that no longer match their digest",
        description="Rehash every cached blob and remove those whose bytes no longer match their "
        "digest. Exit status 1 if any did. Run it while the proxy is stopped.",
    )
    v.add_argument("--config", type=Path, help="YAML config file (for cache_dir)")
    v.add_argument("--cache-dir", metavar="DIR", help="cache directory (default ~/.cache/ocicache)")
    v.add_argument("--keep", action="store_true", help="only report bad blobs, remove nothing")
    return p


def _flags(ns: argparse.Namespace) -> dict[str, Any]:
    # Each subcommand has its own subset of the flags; the ones it lacks stay unset.
    names = {
        "listen": "listen",
        "cache_dir": "cache_dir",
        "upstreams": "upstream",
        "tag_ttl": "tag_ttl",
        "max_cache_size": "max_cache_size",
        "log_level": "log_level",
        "log_format": "log_format",
        "offline": "offline",
        "cluster.redis": "redis",
        "cluster.advertise": "advertise",
    }
    return {key: getattr(ns, attr, None) for key, attr in names.items()}


def run_verify(settings: Settings, *, keep: bool) -> int:
    storage = Storage(settings.cache_dir)
    if not storage.blobs.is_dir():
        print(f"ocicache: no cache at {settings.cache_dir}", file=sys.stderr)
        return 2
    # It removes files: nobody else may be writing. The catalogue drops their rows at the
    # next start (a row without a file).
    with CacheLock(settings.cache_dir):
        report = verify(storage, remove=not keep)
    for digest in report.bad:
        print(f"bad: {digest}" + ("" if keep else " (removed)"))
    print(f"checked {report.checked} blobs, {report.bytes} bytes; {len(report.bad)} bad")
    return 1 if report.bad else 0


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
    cluster = app.get(keys.CLUSTER)
    if cluster is not None and settings.cluster.advertise is None and runner.addresses:
        # The port is known only now (--listen :0).
        host, port, *_ = runner.addresses[0]
        cluster.advertise(advertised(settings.cluster, host, port, tls=ssl_context is not None))
    for host, port, *_ in runner.addresses:
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        log.info(
            "listening",
            advertise=None if cluster is None else cluster.me,
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


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        settings = load(ns.config, _flags(ns))
    except ConfigError as exc:
        print(f"ocicache: config error: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    try:
        if ns.command == "verify":
            return run_verify(settings, keep=ns.keep)
        ssl_context = tls.server_context(settings.tls) if settings.tls is not None else None
        if ns.event_loop == "uvloop":
            import uvloop

            uvloop.run(serve(settings, ssl_context))
        else:
            asyncio.run(serve(settings, ssl_context))
    except ConfigError as exc:  # a file that went bad between reading the settings and serving
        print(f"ocicache: config error: {exc}", file=sys.stderr)
        return 2
    except CacheBusy as exc:
        print(f"ocicache: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ocicache: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
