"""The warm-path benchmark's machinery, briefly: every server answers every workload in full.

A tiny blob and half a second per measurement; no timing is asserted, only that nginx and both
ocicache event loops returned complete bodies with the right status, and no bad ones. Uses the
curl and sink clients, so that wrk need not be installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import get_args

import pytest

from loadtests.bench_warm import NGINX, BenchConfig, ClientKind, MiB, render, run


@pytest.fixture(autouse=True)
def _tools() -> None:
    # scripts/test.sh installs both; a missing one is a broken setup, not a reason to skip.
    assert Path(NGINX).exists(), "nginx-light is not installed"
    assert shutil.which("curl") is not None, "curl is not installed"


@pytest.mark.parametrize("client", ["curl", "sink"])
def test_every_server_returns_full_bodies(tmp_path: Path, client: ClientKind) -> None:
    assert client in get_args(ClientKind)
    cfg = BenchConfig(
        size=MiB // 2,
        connections=2,
        seconds=0.5,
        rounds=1,
        client=client,
        range_bytes=64 * 1024,
        workdir=tmp_path,
    )
    report = run(cfg)

    assert report.servers == ["nginx", "ocicache-uvloop", "ocicache-asyncio"]
    assert [w.name for w in report.workloads] == ["full", "range 0-65535"]
    for wl in report.workloads:
        for server in report.servers:
            (m,) = report.of(server, wl.name)
            assert m.run.bad == 0, (server, wl.name)
            assert m.run.responses > 0, (server, wl.name)
            # curl and sink count body bytes only: at least every complete response's body.
            assert m.run.bytes >= m.run.responses * wl.body, (server, wl.name)
    table = render(report)
    assert table.count("| full |") == 3
    assert "share this machine's" in table
