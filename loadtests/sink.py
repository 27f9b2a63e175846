"""The sink: a light HTTP/1.1 load generator that reads keep-alive responses into one big buffer.

wrk reads 8 KiB at a time; on a machine of two cores, where the client's CPU is taken from the
server's, a client that makes fewer system calls per byte shows more of what the server can do.
The sink has ``--connections`` threads, each one keep-alive connection that sends the same GET
again as soon as the previous body has arrived, and reads bodies with ``recv_into`` into a 1 MiB
buffer. It checks every response's status and length, counts body bytes only, and stops at the
deadline, mid-body if need be (bytes are counted as they arrive).

Run as ``python -m loadtests.sink --port P --path /x [--header 'Range: bytes=0-9'] --status 206
--body 10 --connections 8 --seconds 5``; it prints one JSON line: seconds, bytes, ok, bad, errors.
Every loop is bounded in count and in time; connections go to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

MiB: Final = 1024 * 1024
BUFFER: Final = 1 * MiB
HEAD_MAX: Final = 64 * 1024
IO_TIMEOUT: Final = 30.0
# Time a connection may take beyond the deadline to notice it (one blocked recv at most).
GRACE: Final = IO_TIMEOUT + 5.0
MAX_RESPONSES_PER_CONNECTION: Final = 10_000_000
ERRORS_KEPT: Final = 5


@dataclass
class Tally:
    bytes: int = 0
    ok: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)


def read_head(sock: socket.socket) -> tuple[int, int, bytes, bool]:
    """Status, Content-Length, the body bytes that came with the head, and whether the server
    closes the connection after this answer (``Connection: close``)."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > HEAD_MAX:
            raise ConnectionError("response head too large")
        chunk = sock.recv(HEAD_MAX)
        if not chunk:
            raise ConnectionError("closed before the response head")
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = -1
    closing = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection":
            closing = "close" in value.lower()
    if length < 0:
        raise ConnectionError("response without Content-Length")
    return status, length, rest, closing


def responses(
    port: int, request: bytes, status: int, body: int, deadline: float, tally: Tally, limit: int
) -> bool:
    """Requests on one connection until the deadline, ``limit`` answers, or the server says it
    closes (servers cap requests per connection: nginx's keepalive_requests, ocicache's
    max_requests_per_connection). True when the server closed and another connection may go on."""
    view = memoryview(bytearray(BUFFER))
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        for _ in range(limit):
            if time.monotonic() >= deadline:
                return False
            sock.sendall(request)
            got_status, length, rest, closing = read_head(sock)
            tally.bytes += len(rest)
            left = length - len(rest)
            while left > 0:
                if time.monotonic() >= deadline:
                    return False
                n = sock.recv_into(view, min(left, BUFFER))
                if n == 0:
                    raise ConnectionError("closed mid-body")
                tally.bytes += n
                left -= n
            if got_status == status and length == body:
                tally.ok += 1
            else:
                tally.bad += 1
            if closing:
                return True
    return False


def connection(port: int, request: bytes, status: int, body: int, deadline: float, tally: Tally) -> None:
    """One client connection's worth of load: reconnects when the server ends a keep-alive
    connection the way HTTP/1.1 lets it, with ``Connection: close`` (a close without it is an
    error). Bounded by the deadline and by ``MAX_RESPONSES_PER_CONNECTION`` answers in all."""
    answered = tally.ok + tally.bad
    while answered < MAX_RESPONSES_PER_CONNECTION and time.monotonic() < deadline:
        if not responses(
            port, request, status, body, deadline, tally, MAX_RESPONSES_PER_CONNECTION - answered
        ):
            return
        answered = tally.ok + tally.bad


def run(
    port: int, path: str, headers: Sequence[str], status: int, body: int, connections: int, seconds: float
) -> dict[str, object]:
    extra = "".join(f"{h}\r\n" for h in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    tallies = [Tally() for _ in range(connections)]
    start = time.monotonic()
    deadline = start + seconds

    def worker(tally: Tally) -> None:
        try:
            connection(port, request, status, body, deadline, tally)
        except (OSError, ValueError, IndexError) as exc:
            tally.bad += 1
            tally.errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in tallies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline + GRACE - time.monotonic()))
    elapsed = time.monotonic() - start
    stuck = sum(1 for t in threads if t.is_alive())
    errors = [e for t in tallies for e in t.errors][:ERRORS_KEPT]
    if stuck:
        errors.append(f"{stuck} connection(s) did not finish")
    return {
        "seconds": elapsed,
        "bytes": sum(t.bytes for t in tallies),
        "ok": sum(t.ok for t in tallies),
        "bad": sum(t.bad for t in tallies) + stuck,
        "errors": errors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.sink", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True, help="a port of 127.0.0.1")
    p.add_argument("--path", required=True)
    p.add_argument("--header", action="append", default=[], help="'Name: value'; repeatable")
    p.add_argument("--status", type=int, default=200, help="the status every response must have")
    p.add_argument("--body", type=int, required=True, help="the length every body must have")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    ns = p.parse_args(argv)
    if not (0 < ns.connections <= 1024 and 0 < ns.seconds <= 3600 and 0 < ns.port < 65536):
        p.error("connections, seconds and port out of range")
    result = run(ns.port, ns.path, ns.header, ns.status, ns.body, ns.connections, ns.seconds)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
