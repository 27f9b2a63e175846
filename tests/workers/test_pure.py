"""The pure parts of serve --workers: the headers, the memo, the counts."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.config import Settings, cpu_quota
from proxy.web.accesslog import pipe_sized
from proxy.web.runner import Limits, share
from proxy.workers import internal, tally
from proxy.workers.memo import Memo


def test_relayable_drops_connection_headers_and_ours_either_way() -> None:
    headers = [
        ("Accept", "a"),
        ("Connection", "keep-alive"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "5"),
        ("Ocicache-Internal-Probe", "1"),
        ("OCICACHE-INTERNAL-CLIENT", "10.0.0.1"),
        ("Authorization", "Bearer t"),
        ("Upgrade", "h2c"),
    ]
    assert internal.relayable(headers) == [("Accept", "a"), ("Authorization", "Bearer t")]


@pytest.mark.parametrize(
    ("remaining", "reuse"),
    [(math.inf, internal.REUSE_MAX), (0.25, 0.25), (0.0, 0.0), (-5.0, 0.0), (math.nan, 0.0)],
)
def test_reuse_is_what_is_left_of_the_freshness_and_never_more_than_the_cap(
    remaining: float, reuse: float
) -> None:
    assert internal.reuse_for(remaining) == reuse


@pytest.mark.parametrize(
    ("header", "reuse"),
    [
        (None, 0.0),
        ("0.5", 0.5),
        ("inf", internal.REUSE_MAX),
        ("1e308", internal.REUSE_MAX),
        ("nan", 0.0),
        ("-1", 0.0),
        ("soon", 0.0),
        ("9" * 5000, 0.0),
    ],
)
def test_the_reuse_header_is_read_within_its_bounds(header: str | None, reuse: float) -> None:
    assert internal.parse_reuse(header) == reuse


def test_the_memo_forgets_at_its_deadline_and_within_its_size() -> None:
    now = [0.0]
    memo: Memo[str, int] = Memo(max_bytes=1000, clock=lambda: now[0])
    memo.put("a", 1, 1.0, size=400)
    memo.put("b", 2, 0.5, size=400)
    memo.put("gone", 3, 0.0)  # no reuse time: nothing kept
    assert (memo.get("a"), memo.get("b"), memo.get("gone")) == (1, 2, None)
    now[0] = 0.5
    assert memo.get("b") is None and memo.get("a") == 1
    memo.put("c", 3, 1.0, size=400)
    memo.put("d", 4, 1.0, size=400)  # past 1000 bytes: the least recently used goes
    assert len(memo) == 2 and memo.get("a") is None
    memo.put("huge", 5, 1.0, size=5000)
    assert memo.get("huge") is None
    now[0] = 10.0
    assert sorted(memo.expired()) == [("c", 3), ("d", 4)] and len(memo) == 0


def test_a_tally_goes_as_one_report_and_starts_again() -> None:
    t = tally.Tally()
    assert not t
    t.answered("manifests", "hit", 200, "docker.io", 500)
    t.answered("manifests", "hit", 200, "docker.io", 500)
    t.answered("blobs", "hit", 206, "docker.io", 10)
    t.pulled("docker.io", "library/app", "v1", "hit")
    report = tally.parse(t.take(connections=7, refused={"header_timeout": 2}))
    assert (report.connections, report.refused) == (7, {"header_timeout": 2})
    assert sorted(report.requests) == [
        (("blobs", "hit", 206, "docker.io"), 1, 10),
        (("manifests", "hit", 200, "docker.io"), 2, 1000),
    ]
    assert report.pulls == [(("docker.io", "library/app", "v1", "hit"), 1)]
    assert not t


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b"\xff\xfe",
        b"[]",
        b'{"requests": {}}',
        b'{"requests": [["k", "c", 200, "u", 1]]}',
        b'{"requests": [["k", "c", true, "u", 1, 1]]}',
        b'{"requests": [["k", "c", 200, "u", -1, 1]]}',
        b'{"requests": [["k", "c", 200, "u", 1.5, 1]]}',
        b'{"pulls": [["u", "r", "t", "s", 99999999999999999999999]]}',
        json.dumps({"requests": [["k", "c", 200, "u", 1, 1]] * (tally.MAX_ROWS + 1)}).encode(),
        b'{"connections": -1}',
        b'{"connections": true}',
        b'{"refused": {"Bad Label": 1}}',
        b'{"refused": {"header_timeout": -1}}',
        b'{"refused": []}',
    ],
)
def test_a_report_that_is_not_one_is_refused(body: bytes) -> None:
    with pytest.raises(tally.BadReport):
        tally.parse(body)


@given(st.lists(st.text(max_size=3000), max_size=40))
def test_log_lines_go_out_whole_in_writes_no_larger_than_a_pipe_takes_at_once(lines: list[str]) -> None:
    lines = [line.replace("\n", " ") for line in lines]
    pieces = pipe_sized(lines, limit=4096)
    assert "".join(pieces) == "".join(line + "\n" for line in lines)
    for piece in pieces:
        assert piece.endswith("\n")
        assert len(piece.encode()) <= 4096 or piece.count("\n") == 1


@pytest.mark.parametrize(
    ("limit", "processes", "part"),
    [(256, 1, 256), (256, 2, 162), (256, 3, 114), (4, 4, 4), (64, 2, 49), (0, 2, 0)],
)
def test_processes_on_one_port_share_the_per_address_limit(limit: int, processes: int, part: int) -> None:
    settings = replace(Settings(), max_connections_per_address=limit)
    assert Limits.of(settings, processes).per_address == part


@pytest.mark.parametrize(("limit", "processes"), [(4, 2), (16, 2), (256, 2), (256, 4), (1000, 8)])
def test_an_address_within_its_limit_is_all_but_never_refused_by_its_share(
    limit: int, processes: int
) -> None:
    # The kernel puts each connection on a process by a hash: like a fair die per connection.
    # The chance that some process gets more than its share of `limit` connections, exactly.
    part = share(limit, processes)
    p = 1 / processes
    tail = sum(math.comb(limit, k) * p**k * (1 - p) ** (limit - k) for k in range(part + 1, limit + 1))
    assert processes * tail < 0.01


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("100000 0", None),
        ("", None),
        ("²00000 100000", None),
        ("9" * 40 + " 100000", None),
    ],
)
def test_a_containers_cpu_quota_bounds_the_automatic_process_count(text: str, cpus: int | None) -> None:
    assert cpu_quota(text) == cpus
