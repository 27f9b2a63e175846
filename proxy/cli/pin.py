"""``ocicache pin [REF...]`` and ``ocicache unpin REF...``: images the budget never evicts.

On a cache directory (the proxy stopped), or through a running proxy's admin API with
``--proxy URL``. Pins given here are kept across restarts; those in the config file's ``pins:``
are set at every start and are changed there. ``pin`` without references lists the pins.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from proxy.cli.common import UsageError, add_cache_flags, add_log_flags, out
from proxy.cli.remote import Admin, RemoteError, quoted
from proxy.core.config import Settings
from proxy.core.imageref import BadReference, parse_image_reference
from proxy.store.catalogue import Catalogue
from proxy.store.lock import CacheBusy
from proxy.store.opened import opened

SOURCE = "admin"


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, what in (("pin", "pin images (none given: list the pins)"), ("unpin", "remove pins")):
        p = sub.add_parser(name, help=what, description=__doc__)
        p.add_argument("references", nargs="*" if name == "pin" else "+", metavar="REF")
        add_cache_flags(p)
        p.add_argument("--proxy", metavar="URL", help="act through the running proxy at URL (its admin API)")
        add_log_flags(p, "warning")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    names = [u.name for u in settings.upstreams]
    try:
        refs = [str(parse_image_reference(r, names, names[0])) for r in ns.references]
    except BadReference as exc:
        raise UsageError(str(exc)) from None
    try:
        if ns.proxy:
            lines = _remote(ns.command, refs, Admin(ns.proxy, settings.admin_token))
        else:
            lines = asyncio.run(_local(ns.command, refs, settings))
    except (RemoteError, LookupError) as exc:
        print(f"ocicache: {exc}", file=sys.stderr)
        return 1
    except CacheBusy as exc:
        print(f"ocicache: {exc}; to act on a running proxy, use --proxy URL", file=sys.stderr)
        return 2
    for line in lines:
        out(line)
    return 0


def _remote(command: str, refs: list[str], admin: Admin) -> list[str]:
    lines = []
    for ref in refs:
        if command == "pin":
            done = admin.call("PUT", f"/pins/{quoted(ref)}")
            lines.append(
                f"pinned {done['reference']}"
                + (" (in the config file)" if done["source"] == "config" else "")
            )
        else:
            admin.call("DELETE", f"/pins/{quoted(ref)}")
            lines.append(f"unpinned {ref}")
    if command == "pin" and not refs:
        lines = [f"{p['reference']}\t{p['source']}" for p in admin.call("GET", "/pins")["pins"]]
    return lines


async def _local(command: str, refs: list[str], settings: Settings) -> list[str]:
    async with opened(settings.cache_dir) as (_, catalogue):
        return await _change(command, refs, catalogue)


async def _change(command: str, refs: list[str], catalogue: Catalogue) -> list[str]:
    lines = []
    if command == "pin" and not refs:
        return [f"{r}\t{s}" for r, s in sorted(catalogue.pins.items())]
    for ref in refs:
        source = catalogue.pins.get(ref)
        if command == "pin":
            if source != "config":
                await catalogue.add_pin(ref, SOURCE)
            lines.append(f"pinned {ref}" + (" (in the config file)" if source == "config" else ""))
        elif source is None:
            raise LookupError(f"{ref} is not pinned")
        elif source == "config":
            raise LookupError(f"{ref} is pinned in the config file: remove it there")
        else:
            await catalogue.remove_pin(ref)
            lines.append(f"unpinned {ref}")
    return lines
