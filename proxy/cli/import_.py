"""``ocicache import FILE|DIR``"""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.airgap.importer import ArchiveRefused, ImportReport, import_layout
from proxy.cli.common import add_cache_flags, add_log_flags, err, out, with_engine
from proxy.core.config import Settings
from proxy.flows.engine import Engine


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="read an OCI image layout archive or directory into the cache",
        description="Import an OCI image layout: a .tar, .tar.zst or .tar.gz archive (ocicache "
        "export, skopeo copy ... oci-archive:) or a layout directory (skopeo copy ... oci:). Every "
        "blob is verified while read; a corrupt or truncated input is refused and nothing of it "
        "is kept. Each reference's tag is recorded under its upstream, so an --offline proxy "
        "serves it.",
    )
    p.add_argument("source", type=Path, metavar="FILE|DIR")
    add_cache_flags(p)
    p.add_argument("--max-cache-size", metavar="SIZE", help="disk budget for blobs (default 20GiB)")
    add_log_flags(p, "warning")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    source: Path = ns.source
    if not source.exists():
        err(f"no such file or directory: {source}")
        return 2

    async def work(engine: Engine) -> ImportReport | str:
        try:
            return await import_layout(engine, source)
        except ArchiveRefused as exc:
            return str(exc)

    report = with_engine(settings, work)
    if isinstance(report, str):
        err(report)
        return 1
    for ref in report.references:
        name = str(ref.reference) if ref.reference is not None else (ref.name or "(unnamed)")
        line = f"{'served' if ref.served else 'held  '} {name} {ref.digest}"
        out(line + (f": {ref.note}" if ref.note else ""))
    for note in report.notes:
        out(f"note: {note}")
    out(report.summary())
    return 0
