"""The log set-up: console on a terminal, JSON otherwise, and the console access line."""

from __future__ import annotations

import json

import pytest
import structlog

from proxy.cli.logs import access_line, configure, resolve_format


@pytest.mark.parametrize(
    ("fmt", "tty", "chosen"),
    [
        ("auto", True, "console"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("console", False, "console"),
    ],
)
def test_auto_follows_the_terminal_and_a_flag_overrides_it(fmt: str, tty: bool, chosen: str) -> None:
    assert resolve_format(fmt, tty) == chosen


def request_event(**extra: object) -> dict[str, object]:
    return {
        "event": "request",
        "method": "GET",
        "path": "/v2/library/alpine/manifests/latest",
        "ns": None,
        "user": None,
        "status": 200,
        "bytes": 1534,
        "cache": "hit",
        "upstream": "docker.io",
        "aborted": False,
        "ms": 0.84,
        **extra,
    }


def test_the_console_access_line_reads_like_an_access_log() -> None:
    event = access_line(None, "info", request_event())
    assert event == {"event": "GET /v2/library/alpine/manifests/latest 200 1534B hit docker.io 0.84ms"}


def test_the_console_access_line_keeps_what_says_something() -> None:
    event = access_line(None, "info", request_event(user="ci", ns="ghcr.io", aborted=True))
    assert event["user"] == "ci" and event["ns"] == "ghcr.io" and event["aborted"] is True


def test_other_events_pass_unchanged() -> None:
    event = {"event": "upstream_failed", "upstream": "docker.io", "status": 503}
    assert access_line(None, "warning", dict(event)) == event


def test_console_and_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    fields = {k: v for k, v in request_event().items() if k != "event"}
    try:
        configure("info", "console")
        structlog.get_logger("ocicache.access").info("request", **fields)
        line = capsys.readouterr().err
        assert "GET /v2/library/alpine/manifests/latest 200 1534B hit docker.io 0.84ms" in line
        assert not line.lstrip().startswith("{")
        configure("info", "json")
        structlog.get_logger("ocicache.access").info("request", **fields)
        doc = json.loads(capsys.readouterr().err)
        assert doc["bytes"] == 1534 and doc["upstream"] == "docker.io" and doc["level"] == "info"
    finally:
        configure("warning", "console")
