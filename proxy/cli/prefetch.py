"""``ocicache prefetch REF... [--file LIST] [--platform OS/ARCH]...``"""

from __future__ import annotations

import argparse
from typing import Final

from proxy.airgap.prefetch import PrefetchReport, human_bytes, prefetch
from proxy.cli import progress
from proxy.cli.common import (
    UsageError,
    add_cache_flags,
    add_log_flags,
    add_reference_flags,
    add_referrers_flag,
    err,
    out,
    platforms,
    references,
    with_engine,
)
from proxy.cli.remote import Admin, RemoteError
from proxy.core.config import Settings
from proxy.core.imageref import ImageRef
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
    add_referrers_flag(p)
    add_cache_flags(p)
    p.add_argument("--max-cache-size", metavar="SIZE", help="disk budget for blobs (default 20GiB)")
    p.add_argument(
        "--proxy", metavar="URL", help="run it in the running proxy at URL (its admin API), and wait for it"
    )
    add_log_flags(p, "warning")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    refs = references(ns, settings)
    if not refs:
        raise UsageError("no references given (REF... or --file LIST)")
    wanted = platforms(ns)
    if ns.proxy:
        return remote_prefetch(Admin(ns.proxy, settings.admin_token), refs, wanted)
    shown = progress.for_output()

    async def work(engine: Engine) -> PrefetchReport:
        with shown:
            return await prefetch(
                engine, refs, platforms=wanted, progress=shown, with_referrers=ns.with_referrers
            )

    report = with_engine(settings, work)
    if len(report.references) > 1:  # the failures again, together, before the summary
        for outcome in report.failed:
            out(f"failed: {outcome.reference}: {outcome.error}")
    out(report.summary())
    return 0 if report.ok else 1


# How long one request waits for the job (the proxy answers sooner when it ends), and how many
# such waits a prefetch may take in all (a day).
WAIT: Final = 60
WAITS_MAX: Final = 24 * 60


def remote_prefetch(admin: Admin, refs: list[ImageRef], wanted: frozenset[str] | None) -> int:
    """A job in the running proxy; waits for its end and says what it did."""
    body: dict[str, object] = {"references": [str(r) for r in refs]}
    if wanted is not None:
        body["platforms"] = sorted(wanted)
    try:
        job = admin.call("POST", "/prefetch", body)
        out(f"prefetch job {job['id']} in {admin.base}")
        for _ in range(WAITS_MAX):
            job = admin.call("GET", f"/jobs/{job['id']}?wait={WAIT}", timeout=WAIT + 30)
            if job["state"] not in ("queued", "running"):
                break
    except RemoteError as exc:
        err(str(exc))
        return 1
    if job["state"] != "done":
        err(f"job {job['id']} {job['state']}: {job.get('error')}")
        return 1
    outcome = job["outcome"] or {}
    failed = [r for r in outcome.get("references", []) if not r.get("ok")]
    for r in failed:
        out(f"failed: {r['reference']}: {r['error']}")
    out(
        f"{len(outcome.get('references', []))} references; {outcome.get('blobs_fetched', 0)} blobs fetched "
        f"({human_bytes(outcome.get('bytes_fetched', 0))}), {outcome.get('blobs_cached', 0)} already cached"
    )
    return 1 if failed else 0
