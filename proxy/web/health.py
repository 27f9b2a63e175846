"""``/healthz`` (liveness) and ``/readyz`` (readiness).

``/healthz`` answers 200 while the process can answer at all: a liveness probe that restarts
the proxy only when it is wedged. ``/readyz`` answers 200 only when the proxy can do its work:
the catalogue is open and its writer thread answers, a new file can be created in the cache
directory (its ``tmp/``, where fills start), and the process is not shutting down; otherwise
503 with the reasons, so that a load balancer or Kubernetes stops sending pulls to it (and an
operator reads why).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Final

from aiohttp import web

from proxy.store.catalogue import Catalogue
from proxy.web import keys
from proxy.web.clusterstatus import cluster_status

# How long the catalogue's writer thread may take to answer before it counts as stuck.
CATALOGUE_PROBE_TIMEOUT: Final = 2.0


def readiness(*, catalogue: str | None, cache_dir: str | None, stopping: bool) -> list[str]:
    """The reasons not to send this proxy traffic (empty: ready). Each argument is a problem
    found, or None."""
    reasons = []
    if stopping:
        reasons.append("shutting down")
    if catalogue is not None:
        reasons.append(f"catalogue: {catalogue}")
    if cache_dir is not None:
        reasons.append(f"cache directory: {cache_dir}")
    return reasons


def _try_create(directory: Path) -> None:
    # A new file, as a fill's first step. Empty: a full disk is not a reason to stop sending
    # pulls here (cached content is still served, and fills stream through from memory).
    probe = directory / f".ready-{uuid.uuid4().hex}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


async def _catalogue_problem(catalogue: Catalogue | None) -> str | None:
    if catalogue is None or not catalogue.db.is_open:
        return "not open"
    try:
        async with asyncio.timeout(CATALOGUE_PROBE_TIMEOUT):
            await catalogue.db.run(lambda conn: conn.execute("SELECT 1").fetchone())
    except TimeoutError:
        return f"its writer did not answer within {CATALOGUE_PROBE_TIMEOUT:g} s"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


async def _cache_dir_problem(directory: Path) -> str | None:
    try:
        await asyncio.to_thread(_try_create, directory)
    except OSError as exc:
        return f"cannot write in {directory}: {exc.strerror or type(exc).__name__}"
    return None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    life = app[keys.LIFECYCLE]
    catalogue = app.get(keys.CATALOGUE)
    storage = app.get(keys.STORAGE)
    reasons = readiness(
        catalogue=await _catalogue_problem(catalogue),
        cache_dir="not open" if storage is None else await _cache_dir_problem(storage.tmp),
        stopping=life.stopping,
    )
    if reasons:
        return web.json_response({"status": "unavailable", "reasons": reasons}, status=503)
    cluster = cluster_status(app)
    if cluster is None:
        return web.json_response({"status": "ready"})
    # Ready either way: a replica without Redis still serves its cache and fetches alone. Taking
    # every replica out of a Service because Redis is down would turn a degraded cluster into none.
    return web.json_response({"status": "ready", "cluster": cluster})
