"""``ocicache prefetch REF... [--file LIST] [--platform OS/ARCH]...``"""

from __future__ import annotations

import argparse

from proxy.airgap.prefetch import PrefetchReport, prefetch
from proxy.cli import progress
from proxy.cli.common import (
    UsageError,
    add_cache_flags,
    add_log_flags,
    add_reference_flags,
    out,
    platforms,
    references,
    with_engine,
)
from proxy.core.config import Settings
from proxy.flows.engine import Engine


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prefetch",
        help="put images into the cache, verified, as a pull would",
        description="Fetch each reference's index, manifests, configs and layers into the cache "
        "directory, verified as a pull through the proxy would verify them; blobs already cached "
        "are not fetched again. Exit status 1 if any reference failed (each is named).",
    )
    add_reference_flags(p)
    add_cache_flags(p)
    p.add_argument("--max-cache-size", metavar="SIZE", help="disk budget for blobs (default 20GiB)")
    add_log_flags(p, "warning")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    refs = references(ns, settings)
    if not refs:
        raise UsageError("no references given (REF... or --file LIST)")
    wanted = platforms(ns)
    shown = progress.for_output()

    async def work(engine: Engine) -> PrefetchReport:
        with shown:
            return await prefetch(engine, refs, platforms=wanted, progress=shown)

    report = with_engine(settings, work)
    if len(report.references) > 1:  # the failures again, together, before the summary
        for outcome in report.failed:
            out(f"failed: {outcome.reference}: {outcome.error}")
    out(report.summary())
    return 0 if report.ok else 1
