"""``ocicache ls [--json]``"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

from proxy.airgap.prefetch import human_bytes
from proxy.cli.common import add_cache_flags, add_log_flags, out, with_engine
from proxy.core.config import Settings
from proxy.flows.engine import Engine
from proxy.store.images import ImageRow, image_rows


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ls",
        help="list the cached images",
        description="One row per cached image (upstream/repository:tag, digest, platforms, size on "
        "disk, last pulled, pinned), then a summary: blobs, bytes, budget.",
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    add_cache_flags(p)
    add_log_flags(p, "warning")


@dataclass
class Listing:
    rows: list[ImageRow]
    blobs: int
    bytes: int
    budget: int


def ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"


def table(listing: Listing, now: float) -> list[str]:
    head = ("REFERENCE", "DIGEST", "PLATFORMS", "SIZE", "LAST PULLED", "PINNED")
    cells = [head]
    for r in listing.rows:
        cells.append(
            (
                r.reference,
                r.digest,
                ",".join(r.platforms) or "-",
                human_bytes(r.size),
                ago(now - r.last_used) if r.last_used else "-",
                "yes" if r.pinned else "",
            )
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    share = f" ({100 * listing.bytes / listing.budget:.0f}%)" if listing.budget else ""
    lines.append(
        f"{len(listing.rows)} images; {listing.blobs} blobs, {human_bytes(listing.bytes)} "
        f"of a {human_bytes(listing.budget)} budget{share}"
    )
    return lines


def as_json(listing: Listing) -> str:
    images = [
        {
            "reference": r.reference,
            "upstream": r.upstream,
            "repository": r.repository,
            "tag": r.tag,
            "digest": r.digest,
            "media_type": r.media_type,
            "platforms": list(r.platforms),
            "size": r.size,
            "last_used": r.last_used,
            "pinned": r.pinned,
        }
        for r in listing.rows
    ]
    doc = {"images": images, "blobs": listing.blobs, "bytes": listing.bytes, "budget": listing.budget}
    return json.dumps(doc, indent=2)


def run(settings: Settings, ns: argparse.Namespace) -> int:
    async def work(engine: Engine) -> Listing:
        await engine.cache.checked()
        rows = image_rows(engine.catalogue, engine.pinned())
        return Listing(rows, len(engine.catalogue.blobs), engine.catalogue.total, engine.cache.max_bytes)

    listing = with_engine(settings, work)
    if ns.json:
        out(as_json(listing))
    else:
        for line in table(listing, time.time()):
            out(line)
    return 0
