"""``ocicache verify``: rehash every cached blob; remove those that no longer match."""

from __future__ import annotations

import argparse
import sys

from proxy.cli.common import add_cache_flags
from proxy.core.config import Settings
from proxy.store.lock import CacheLock
from proxy.store.storage import Storage
from proxy.store.verify import verify


def add(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "verify",
        help="rehash every cached blob; remove those that no longer match their digest",
        description="Rehash every cached blob and remove those whose bytes no longer match their "
        "digest. Exit status 1 if any did. Run it while the proxy is stopped.",
    )
    add_cache_flags(v, upstreams=False)
    v.add_argument("--keep", action="store_true", help="only report bad blobs, remove nothing")


def run(settings: Settings, ns: argparse.Namespace) -> int:
    storage = Storage(settings.cache_dir)
    if not storage.blobs.is_dir():
        print(f"ocicache: no cache at {settings.cache_dir}", file=sys.stderr)
        return 2
    # It removes files: nobody else may be writing. The catalogue drops their rows at the
    # next start (a row without a file).
    with CacheLock(settings.cache_dir):
        report = verify(storage, remove=not ns.keep)
    for digest in report.bad:
        print(f"bad: {digest}" + ("" if ns.keep else " (removed)"))
    print(f"checked {report.checked} blobs, {report.bytes} bytes; {len(report.bad)} bad")
    return 1 if report.bad else 0
