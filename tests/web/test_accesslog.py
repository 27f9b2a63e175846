"""The batched JSON request line ``serve`` uses: the line structlog's JSON renderer writes
(same keys and values, the same timestamp form), one stream write per loop turn however many
requests the turn answered, flushed when the app stops, and never a failed request because
stderr is closed."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from proxy.cli.logs import access_log, configure
from proxy.web.accesslog import BATCH_MAX, PIPE_BUF, JsonLines, ThroughStructlog, pipe_sized
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import MANIFEST_ACCEPT, make_image
from tests.support.proxyproc import serving

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def fields(**extra: Any) -> dict[str, Any]:
    return {
        "method": "GET",
        "path": '/v2/library/"odd"\u00e9/manifests/latest',
        "ns": None,
        "user": "ci",
        "status": 200,
        "bytes": 1534,
        "cache": "hit",
        "upstream": "docker.io",
        "aborted": False,
        "ms": 0.84,
        **extra,
    }


async def after_callbacks_scheduled_so_far() -> None:
    """Callbacks run in the order they were scheduled: one scheduled now runs after them."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


class Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.sizes: list[int] = []

    def write(self, s: str) -> int:
        self.writes += 1
        self.sizes.append(len(s.encode()))
        return super().write(s)


def test_the_line_is_structlogs_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure("info", "json")
        structlog.get_logger("ocicache.access").info("request", **fields())
        theirs = json.loads(capsys.readouterr().err)
    finally:
        configure("warning", "console")
    stream = Counting()
    JsonLines(lambda: stream).write(fields())  # no running loop: written at once
    raw = stream.getvalue()
    ours = json.loads(raw)
    assert raw.endswith("\n") and raw.count("\n") == 1
    assert ISO_UTC.fullmatch(ours.pop("timestamp")) and ISO_UTC.fullmatch(theirs.pop("timestamp"))
    assert ours == theirs
    assert raw.isascii()  # as structlog's renderer: ensure_ascii


async def test_a_loop_turns_lines_go_in_as_few_writes_as_a_pipe_takes_whole() -> None:
    stream = Counting()
    lines = JsonLines(lambda: stream)
    for n in range(50):
        lines.write(fields(status=200 + n % 2))
    assert stream.writes == 0  # nothing until the turn ends
    await after_callbacks_scheduled_so_far()  # the flush the writes scheduled has run
    total = len(stream.getvalue().encode())
    assert total > PIPE_BUF  # so more than one write, each of whole lines within PIPE_BUF
    assert all(size <= PIPE_BUF for size in stream.sizes)
    assert stream.writes == len(pipe_sized(stream.getvalue().splitlines()))
    assert stream.writes <= total // (PIPE_BUF // 2) + 1
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(docs) == 50 and [d["status"] for d in docs[:2]] == [200, 201]


async def test_a_big_batch_is_written_before_the_turn_ends() -> None:
    stream = Counting()
    lines = JsonLines(lambda: stream)
    long_path = "/v2/" + "a" * 1000
    for _ in range(BATCH_MAX // 1000 + 2):
        lines.write(fields(path=long_path))
    assert stream.writes >= 1  # bounded memory: at most BATCH_MAX characters wait
    lines.flush()
    assert len(stream.getvalue().splitlines()) == BATCH_MAX // 1000 + 2


async def test_flush_writes_what_waits_and_a_closed_stream_loses_lines_not_requests() -> None:
    stream = Counting()
    lines = JsonLines(lambda: stream)
    lines.write(fields())
    lines.flush()  # what the app's cleanup does on a clean stop
    assert json.loads(stream.getvalue())["cache"] == "hit"
    closed = io.StringIO()
    closed.close()
    gone = JsonLines(lambda: closed)
    gone.write(fields())
    gone.flush()  # no exception


@pytest.mark.parametrize(
    ("level", "fmt", "kind"),
    [
        ("info", "json", JsonLines),
        ("debug", "json", JsonLines),
        ("warning", "json", ThroughStructlog),  # structlog drops info lines
        ("info", "console", ThroughStructlog),  # people read these; no need for speed
    ],
)
def test_serve_takes_the_batched_writer_only_for_json_at_info(level: str, fmt: str, kind: type) -> None:
    try:
        configure(level, fmt)
        assert isinstance(access_log(), kind)
    finally:
        configure("warning", "console")


async def test_a_serve_process_logs_every_request_as_one_whole_line(
    tmp_path: Path, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    image = make_image()
    fake.add_image("library/app", image, tag="v1")
    async with serving(tmp_path / "cache", {"docker.io": fake.url}, logs=True) as proxy:
        url = f"{proxy.url}/v2/library/app/manifests/v1"

        async def pull(n: int) -> int:
            async with session.get(f"{url}?n={n}", headers={"Accept": MANIFEST_ACCEPT}) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(pull(n) for n in range(200))) == [200] * 200
        async with session.get(f"{proxy.url}/v2/library/app/manifests/last-one") as resp:
            assert resp.status == 404
        proxy.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proxy.proc.wait(), 30) == 0
    requests = [e for e in proxy.events if e.get("event") == "request"]
    assert len(requests) == 201  # every line parsed whole: none split or merged by batching
    assert sum(e["path"] == "/v2/library/app/manifests/v1" for e in requests) == 200
    assert requests[-1]["path"].endswith("/last-one") and requests[-1]["status"] == 404
    assert all(e["level"] == "info" and ISO_UTC.fullmatch(e["timestamp"]) for e in requests)
