"""``python -m proxy COMMAND ...`` (also installed as ``ocicache``): flags, config, run.

Each command is a module with ``add(subparsers)`` and ``run(settings, namespace) -> exit status``.
Commands that write a cache directory run an :class:`~proxy.flows.engine.Engine` of their own,
and refuse a directory another process (a running ``serve``) holds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from proxy import __version__
from proxy.cli import export, import_, ls, prefetch, rm, serve, verify
from proxy.cli.common import UsageError, flags
from proxy.cli.logs import configure
from proxy.core.config import load
from proxy.core.configvalues import ConfigError
from proxy.store.lock import CacheBusy

COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "prefetch": prefetch,
    "export": export,
    "import": import_,
    "ls": ls,
    "rm": rm,
    "verify": verify,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocicache",
        description="A pull-through caching proxy for OCI container registries.",
    )
    p.add_argument("--version", action="version", version=f"ocicache {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        settings = load(ns.config, flags(ns))
    except ConfigError as exc:
        print(f"ocicache: config error: {exc}", file=sys.stderr)
        return 2
    # Commands print what they did; their log is for warnings unless asked for more.
    level = settings.log_level if ns.command == "serve" else (getattr(ns, "log_level", None) or "warning")
    configure(level, settings.log_format)
    try:
        status: int = COMMANDS[ns.command].run(settings, ns)
        return status
    except UsageError as exc:
        print(f"ocicache {ns.command}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # a file that went bad between reading the settings and serving
        print(f"ocicache: config error: {exc}", file=sys.stderr)
        return 2
    except CacheBusy as exc:
        print(f"ocicache: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ocicache: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"ocicache: cannot {ns.command}: {exc}", file=sys.stderr)
        return 1
