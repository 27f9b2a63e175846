"""Replicas against one cache: 30 clients pull one cold blob through 3 replicas sharing a Redis,
and through 1 replica alone, in the same run. Reports upstream GETs and bytes, wall time (the
ratio of the two set-ups is the figure; seconds depend on the machine) and the bytes the
replicas served each other.

    python -m loadtests.cluster [--size-mib 64] [--clients 30] [--rounds 3]

Everything runs on this machine's loopback: the fake upstream and the clients in this process,
each replica and redis-server in processes of their own, no CPU pinning (all share the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.fake_upstream import FakeUpstream
from tests.support.proxyproc import serving
from tests.support.redisserver import RedisServer

MiB = 1024 * 1024
TOKEN = "loadtest-cluster-token-0123456789"


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def pull(session: aiohttp.ClientSession, url: str, digest: str) -> int:
    hasher = hashlib.sha256()
    async with session.get(url) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1024 * 1024):
            hasher.update(chunk)
    assert "sha256:" + hasher.hexdigest() == digest
    return 1


async def one_run(replicas: int, clients: int, size: int, work: Path, seed: int) -> dict[str, Any]:
    data = os.urandom(size)
    async with FakeUpstream() as fake, AsyncExitStack() as stack:
        digest = fake.add_blob(data)
        extra: list[str] = []
        if replicas > 1:
            redis = stack.enter_context(RedisServer(work / f"redis{seed}"))
            os.environ["OCICACHE_CLUSTER"] = "{token_env: LOADTEST_CLUSTER_TOKEN}"
            os.environ["LOADTEST_CLUSTER_TOKEN"] = TOKEN
            extra = ["--redis", redis.url]
        procs = [
            await stack.enter_async_context(
                serving(work / f"run{seed}-cache{i}", {"docker.io": fake.url}, *extra)
            )
            for i in range(replicas)
        ]
        os.environ.pop("OCICACHE_CLUSTER", None)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    pull(session, f"{procs[i % replicas].url}/v2/library/app/blobs/{digest}", digest)
                    for i in range(clients)
                )
            )
            wall = time.perf_counter() - started
            peer_bytes = 0.0
            for proc in procs:
                peer_bytes += await metric(
                    session, proc.url, 'ocicache_cluster_total{event="peer_served_bytes"}'
                )
        return {
            "replicas": replicas,
            "clients": clients,
            "size": size,
            "wall_s": wall,
            "upstream_gets": fake.count(origin="registry", method="GET", path_contains="/blobs/"),
            "upstream_bytes": fake.sent_bytes.get(digest, 0),
            "peer_bytes": int(peer_bytes),
        }


async def main(size_mib: int, clients: int, rounds: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {"single": [], "three": []}
    with tempfile.TemporaryDirectory(prefix="ocicache-cluster-") as tmp:
        work = Path(tmp)
        for r in range(rounds):
            # Alternate which goes first, so neither always meets a warmer machine.
            order = (("single", 1), ("three", 3)) if r % 2 == 0 else (("three", 3), ("single", 1))
            for label, n in order:
                results[label].append(await one_run(n, clients, size_mib * MiB, work, seed=10 * r + n))
    single = statistics.median(x["wall_s"] for x in results["single"])
    three = statistics.median(x["wall_s"] for x in results["three"])
    return {
        "runs": results,
        "median_wall_s": {"single": round(single, 3), "three": round(three, 3)},
        "wall_ratio_three_over_single": round(three / single, 2),
    }


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--size-mib", type=int, default=64)
    args.add_argument("--clients", type=int, default=30)
    args.add_argument("--rounds", type=int, default=3)
    ns = args.parse_args()
    print(json.dumps(asyncio.run(main(ns.size_mib, ns.clients, ns.rounds)), indent=2))
