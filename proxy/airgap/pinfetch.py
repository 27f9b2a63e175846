"""``serve`` at start-up: fetch the ``pins:`` that the cache does not hold completely.

Runs in the background (the proxy serves meanwhile), when online, with the same prefetch as
the command line: every platform, verified, committed as pulls commit. A pin that cannot be
fetched is logged, and the proxy goes on serving; it is tried again at the next start.
"""

from __future__ import annotations

import structlog

from proxy.airgap.prefetch import PrefetchReport, complete, prefetch
from proxy.airgap.reflist import resolve
from proxy.flows.engine import Engine

log = structlog.get_logger("ocicache.pins")


async def fetch_missing_pins(engine: Engine) -> PrefetchReport | None:
    settings = engine.settings
    if settings.offline or not settings.pins:
        return None
    refs, errors = resolve(settings.pins, [u.name for u in settings.upstreams])
    for error in errors:
        log.warning("pin_unusable", reason=error)
    missing = [r for r in refs if not complete(engine.catalogue, r)]
    if not missing:
        return None
    log.info("pins_prefetch_started", references=[str(r) for r in missing])
    report = await prefetch(engine, missing)
    for outcome in report.failed:
        log.warning("pin_not_fetched", reference=str(outcome.reference), reason=outcome.error)
    log.info(
        "pins_prefetched",
        references=len(report.references),
        failed=len(report.failed),
        blobs_fetched=report.blobs_fetched,
        bytes_fetched=report.bytes_fetched,
    )
    return report
