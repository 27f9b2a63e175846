"""What every subcommand shares: the flags that locate the cache and its upstreams, the
settings they make, the references a command is given, and running a command's engine."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from proxy.airgap.graph import BadPlatform, parse_platform
from proxy.airgap.reflist import read_list, resolve
from proxy.core.config import Settings
from proxy.core.imageref import ImageRef
from proxy.flows.engine import Engine, running

T = TypeVar("T")

UPSTREAM_HELP = (
    "registry clients call NAME, reached at URL; repeatable; the first is the default for "
    "references that name no registry. Replaces the built-in list (Docker Hub, ghcr.io, "
    "quay.io, registry.k8s.io, gcr.io, public.ecr.aws, mcr.microsoft.com)"
)


class UsageError(Exception):
    """Bad arguments: the message says which; exit status 2."""


def add_cache_flags(p: argparse.ArgumentParser, *, upstreams: bool = True) -> None:
    p.add_argument("--config", type=Path, help="YAML config file (see config/ocicache.example.yaml)")
    p.add_argument("--cache-dir", metavar="DIR", help="cache directory (default ~/.cache/ocicache)")
    if upstreams:
        p.add_argument("--upstream", metavar="NAME=URL", action="append", help=UPSTREAM_HELP)


def add_log_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help=f"default {default}")
    p.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        help="default auto: console on a terminal, else json",
    )


def add_referrers_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--with-referrers",
        action="store_true",
        help="also the referrers of every manifest carried (signatures, SBOMs, attestations: "
        "what the referrers API lists), with their blobs; not referrers of referrers",
    )


def add_reference_flags(p: argparse.ArgumentParser, *, platforms: bool = True) -> None:
    p.add_argument(
        "references",
        nargs="*",
        metavar="REF",
        help="image references: docker.io/library/alpine:3.20, alpine, ghcr.io/org/app@sha256:...",
    )
    p.add_argument(
        "--file",
        type=Path,
        action="append",
        default=[],
        metavar="LIST",
        help="read references from LIST, one per line, # comments; repeatable",
    )
    if platforms:
        p.add_argument(
            "--platform",
            action="append",
            default=[],
            metavar="OS/ARCH",
            help="only these platforms of an index (repeatable; default every platform); "
            "the index itself is kept whole",
        )


def flags(ns: argparse.Namespace) -> dict[str, Any]:
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
        "workers": "workers",
        "cluster.redis": "redis",
        "cluster.advertise": "advertise",
    }
    return {key: getattr(ns, attr, None) for key, attr in names.items()}


def references(ns: argparse.Namespace, settings: Settings) -> list[ImageRef]:
    texts = list(ns.references)
    for path in ns.file:
        try:
            texts += read_list(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
    refs, errors = resolve(texts, [u.name for u in settings.upstreams])
    if errors:
        raise UsageError("\n".join(errors))
    return refs


def platforms(ns: argparse.Namespace) -> frozenset[str] | None:
    try:
        wanted = frozenset(parse_platform(p) for p in ns.platform)
    except BadPlatform as exc:
        raise UsageError(str(exc)) from None
    return wanted or None


def with_engine(settings: Settings, work: Callable[[Engine], Awaitable[T]]) -> T:
    """Run ``work`` on an engine over the cache directory (locked: CacheBusy if it is not free)."""

    async def main() -> T:
        async with running(settings) as engine:
            return await work(engine)

    return asyncio.run(main())


def out(text: str) -> None:
    print(text, flush=True)


def err(text: str) -> None:
    print(f"ocicache: {text}", file=sys.stderr, flush=True)
