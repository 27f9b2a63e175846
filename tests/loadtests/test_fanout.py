"""The cold fan-out engine (loadtests/fanout.py) runs end to end: a small blob, one and two
clients, ocicache only, with the upstream reached directly and through the shaped link. It checks
the report's shape and single-flight accounting, never timings (those belong to the benchmark run
itself, on a quiet machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.fanout import BenchConfig, run_benchmark
from loadtests.shaper import MB

MiB = 1024 * 1024
# Response heads (a few hundred bytes each) of the handful of requests a cold run makes.
HEADS_ALLOWANCE = 16 * 1024


# 1: clients in this process; 2: in two worker processes (loadtests.clients), as on the CLI.
@pytest.mark.parametrize("client_procs", [1, 2])
async def test_benchmark_reports_one_upstream_fetch_per_blob_for_ocicache(
    tmp_path: Path, client_procs: int
) -> None:
    config = BenchConfig(
        size=2 * MiB,
        clients=(1, 2),
        proxies=("ocicache",),
        stalled=2,
        repeat=1,
        client_procs=client_procs,
        deadline=120,
        workdir=tmp_path,
    )
    report = await run_benchmark(config)

    shown = [(row.proxy, row.scenario, row.clients, row.stalled) for row in report.rows()]
    assert shown == [
        ("ocicache", "cold", 1, 0),
        ("ocicache", "warm", 1, 0),
        ("ocicache", "cold", 2, 0),
        ("ocicache", "warm", 2, 0),
        ("ocicache", "stalled", 1, 2),
    ]
    for row in report.rows():
        if row.scenario == "warm":
            continue
        assert row.upstream_gets == [1], row
        assert [f"{x:.2f}" for x in report.upstream_ratios(row)] == ["1.00"], row
        assert row.peak_rss is not None and row.peak_rss > 0
    assert report.blob_size > 2 * MiB  # the payload plus its tar framing

    text = report.markdown()
    assert "| ocicache | cold | 2 | 1 | 1.00 |" in text
    assert "| upstream bytes / blob = 1.00 at every N | N=1: 1.00, N=2: 1.00 | yes |" in text


async def test_shaped_link_carries_the_one_upstream_fetch(tmp_path: Path) -> None:
    """--upstream-mbps: the proxy reaches the upstream through the shaping relay, and the relay's
    own count of what it carried matches what the upstream sent. Byte counts only: whether the
    relay keeps to its rate is a timing, which a smoke test does not judge."""
    config = BenchConfig(
        size=2 * MiB,
        clients=(1, 2),
        proxies=("ocicache",),
        stalled=0,
        warm=False,
        repeat=1,
        client_procs=1,
        deadline=120,
        workdir=tmp_path,
        upstream_rate=20 * MB,
    )
    report = await run_benchmark(config)

    assert [(row.scenario, row.clients) for row in report.rows()] == [("cold", 1), ("cold", 2)]
    for row in report.rows():
        assert row.upstream_gets == [1], row
        assert [f"{x:.2f}" for x in report.upstream_ratios(row)] == ["1.00"], row
        # The link carried the upstream's body bytes plus the HTTP heads around them (and the
        # proxy's few small requests besides the blob): equal up to those heads.
        [upstream], [link] = row.upstream_bytes, row.link_bytes
        assert upstream <= link <= upstream + HEADS_ALLOWANCE, row
        assert row.relay_cpu is not None

    text = report.markdown()
    assert "shaped to 20 MB/s each way" in text
    assert "| ocicache | cold | 2 | 1 | 1.00 |" in text
