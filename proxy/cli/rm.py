"""``ocicache rm REF... | --repository NAME | --unused-for DURATION``"""

from __future__ import annotations

import argparse

from proxy.airgap.removal import RemovalReport, remove_images
from proxy.cli.common import UsageError, add_cache_flags, add_log_flags, out, references, with_engine
from proxy.core.config import Settings
from proxy.core.configvalues import ConfigError, parse_seconds
from proxy.core.imageref import BadReference, parse_image_reference
from proxy.flows.engine import Engine


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rm",
        help="remove cached images",
        description="Remove images by reference, by repository, or unused for a while. A blob "
        "another cached image needs stays, and so does everything a pin needs. Says what it freed.",
    )
    p.add_argument(
        "references", nargs="*", metavar="REF", help="images: alpine:3.20, ghcr.io/org/app@sha256:..."
    )
    p.add_argument(
        "--repository", metavar="NAME", help="every image of a repository (docker.io/library/alpine)"
    )
    p.add_argument("--unused-for", metavar="DURATION", help="images not pulled for this long (7d, 12h, 90m)")
    p.set_defaults(file=[])
    add_cache_flags(p)
    add_log_flags(p, "warning")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    refs = references(ns, settings)
    names = [u.name for u in settings.upstreams]
    repository = None
    if ns.repository is not None:
        try:
            repository = parse_image_reference(ns.repository, names, names[0])
        except BadReference as exc:
            raise UsageError(str(exc)) from None
    unused = None
    if ns.unused_for is not None:
        try:
            unused = parse_seconds("--unused-for", ns.unused_for)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if not refs and repository is None and unused is None:
        raise UsageError("say what to remove: REF..., --repository NAME or --unused-for DURATION")

    async def work(engine: Engine) -> RemovalReport:
        return await remove_images(engine, refs, repository=repository, unused_for=unused)

    report = with_engine(settings, work)
    for row in report.removed:
        out(f"removed {row.reference} {row.digest}")
    for row in report.pinned:
        out(f"kept    {row.reference}: pinned (unpin it first)")
    for text in report.unknown:
        out(f"no such image: {text}")
    out(report.summary())
    return 1 if report.unknown else 0
