"""/metrics: the series the issue asks for, the names the Grafana dashboard reads, and no
``_created`` series."""

from __future__ import annotations

import os

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "_created" not in text
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


async def test_the_series_an_operator_needs(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image(layer_sizes=(20_000,))
    fake.add_image("library/app", image, tag="v1")
    # A budget that holds one blob, so the second one evicts the first.
    other = os.urandom(30_000)
    other_digest = fake.add_blob(other)
    proxy = await start_proxy({"docker.io": fake.url}, max_cache_bytes=40_000, low_watermark=0.5)
    for _ in range(2):
        async with session.get(
            f"{proxy.url}/v2/library/app/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        ) as r:
            assert r.status == 200
    for digest in (image.layers[0].digest, other_digest):
        async with session.get(f"{proxy.url}/v2/library/app/blobs/{digest}") as r:
            assert r.status == 200
            await r.read()
        await proxy.cached()
    m = await scrape(session, proxy.url)
    assert m["ocicache_cache_budget_bytes"] == [({}, 40_000.0)]
    assert m["ocicache_evictions_total"][0][1] >= 1
    assert m["ocicache_evicted_bytes_total"][0][1] >= 20_000
    by_result: dict[tuple[str, str], float] = {}
    for labels, value in m["ocicache_requests_total"]:
        key = (labels["cache"], labels["upstream"])
        by_result[key] = by_result.get(key, 0.0) + value
    assert by_result[("miss", "docker.io")] == 3 and by_result[("hit", "docker.io")] == 1
    operations = {labels["operation"] for labels, _ in m["ocicache_upstream_request_seconds_count"]}
    assert {"manifest", "blob"} <= operations
    assert all(
        labels["upstream"] == "docker.io" for labels, _ in m["ocicache_upstream_request_seconds_bucket"]
    )
    assert m["ocicache_upstream_manifest_bytes_total"] == [
        ({"upstream": "docker.io"}, float(len(image.manifest)))
    ]
    for name in (
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "python_info",
        "ocicache_cache_bytes",
        "ocicache_cache_blobs",
        "ocicache_fills_active",
        "ocicache_purges_total",
    ):
        assert name in m, name
    assert {labels["state"] for labels, _ in m["ocicache_prefetch_jobs"]} >= {
        "queued",
        "running",
        "done",
        "failed",
    }
