"""``ocicache export --output FILE REF... | --all``"""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.airgap.exporter import ExportError, ExportReport, export
from proxy.cli import progress
from proxy.cli.common import (
    UsageError,
    add_cache_flags,
    add_log_flags,
    add_reference_flags,
    err,
    out,
    platforms,
    references,
    with_engine,
)
from proxy.core.config import Settings
from proxy.core.imageref import ImageRef
from proxy.flows.engine import Engine
from proxy.store.images import image_rows


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="write cached images to an OCI image layout archive",
        description="Write the references (or every tagged image, --all) to an OCI image layout "
        "archive: .tar, or .tar.zst compressed with zstd. What the cache lacks is prefetched first "
        "unless --offline; the export fails naming what is still missing. Readable by skopeo "
        "(oci-archive:FILE:REF), ctr images import and ocicache import.",
    )
    add_reference_flags(p)
    p.add_argument(
        "--output", "-o", type=Path, required=True, metavar="FILE", help="FILE.tar or FILE.tar.zst"
    )
    p.add_argument("--all", action="store_true", help="every tagged image in the cache")
    p.add_argument(
        "--offline",
        action="store_const",
        const=True,
        help="never contact an upstream: export only what is cached",
    )
    add_cache_flags(p)
    add_log_flags(p, "warning")


def _every_tagged(engine: Engine) -> list[ImageRef]:
    rows = image_rows(engine.catalogue, engine.pinned())
    return [
        ImageRef(r.upstream, r.repository, r.tag, None)
        for r in rows
        if r.upstream is not None and r.repository is not None and r.tag is not None
    ]


def run(settings: Settings, ns: argparse.Namespace) -> int:
    refs = references(ns, settings)
    if ns.all == bool(refs):
        raise UsageError("give either references (REF... or --file LIST) or --all")
    output: Path = ns.output
    if not output.parent.is_dir():
        raise UsageError(f"no directory {output.parent} for {output}")
    wanted = platforms(ns)
    shown = progress.for_output()

    async def work(engine: Engine) -> ExportReport | str:
        chosen = _every_tagged(engine) if ns.all else refs
        if not chosen:
            return "the cache holds no tagged image"
        with shown:
            try:
                return await export(engine, chosen, output, platforms=wanted, progress=shown)
            except ExportError as exc:
                return str(exc)

    report = with_engine(settings, work)
    if isinstance(report, str):
        err(f"export failed, nothing written:\n{report}")
        return 1
    for planned in report.references:
        out(f"{planned.reference} {planned.root.digest} ({len(planned.digests)} blobs)")
    out(report.summary())
    return 0
