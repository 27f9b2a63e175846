"""structlog set-up: one JSON or console line per event, to stderr.

``auto`` picks the console format when stderr is a terminal (a person is reading) and JSON
lines otherwise (a collector is). On the console the per-request event reads like an access
log line: ``GET /v2/library/alpine/manifests/latest 200 1534B hit docker.io 0.84ms``.

Named ``logs`` rather than ``logging`` so that it does not shadow the standard library.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from proxy.web.accesslog import AccessLog, JsonLines, ThroughStructlog

# The access line's fields, in the order it shows them; what is left follows as key=value.
ACCESS_EVENT: Final = "request"
_ACCESS_FIELDS: Final = ("method", "path", "status", "bytes", "cache", "upstream", "ms")


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (tests and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def resolve_format(fmt: str, tty: bool) -> str:
    if fmt == "auto":
        return "console" if tty else "json"
    return fmt


def access_line(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """For the console: the request event as one access-log line; other events unchanged."""
    if event.get("event") != ACCESS_EVENT or "status" not in event:
        return event
    method, path, status, sent, cache, upstream, ms = (event.pop(k, None) for k in _ACCESS_FIELDS)
    event["event"] = f"{method} {path} {status} {sent}B {cache} {upstream or '-'} {ms}ms"
    # Only what says something: a user, containerd's ns=, an aborted response.
    for key in ("ns", "user"):
        if event.get(key) is None:
            event.pop(key, None)
    if not event.get("aborted"):
        event.pop("aborted", None)
    return event


_chosen: tuple[str, str] = ("info", "console")


def access_log() -> AccessLog:
    """The request line's writer for what :func:`configure` chose last: the batched JSON
    writer for JSON lines at info or debug, else structlog (console lines, or none at all)."""
    level, fmt = _chosen
    if fmt == "json" and level in ("debug", "info"):
        return JsonLines()
    return ThroughStructlog()


def configure(level: str = "info", fmt: str = "auto") -> None:
    global _chosen
    chosen = resolve_format(fmt, sys.stderr.isatty())
    _chosen = (level.lower(), chosen)
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if chosen == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors += [access_line, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
