"""The sink client honours a server that ends keep-alive connections with ``Connection: close``
(nginx after keepalive_requests, ocicache after max_requests_per_connection): it reconnects
instead of counting the next request's closed socket as a bad answer."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from loadtests import sink

BODY = b"x" * 100
PER_CONNECTION = 3


class _Capped(socketserver.BaseRequestHandler):
    """Answers PER_CONNECTION requests, the last with Connection: close, then closes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        pending = b""
        for n in range(1, PER_CONNECTION + 1):
            while b"\r\n\r\n" not in pending:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                pending += chunk
            _, _, pending = pending.partition(b"\r\n\r\n")
            close = b"Connection: close\r\n" if n == PER_CONNECTION else b""
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n" + close + b"\r\n" + BODY)


@pytest.fixture
def capped() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Capped)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_closes_after_a_few_answers_is_followed_to_a_new_connection(capped: int) -> None:
    result = sink.run(capped, "/blob", [], 200, len(BODY), connections=2, seconds=0.5)
    assert result["errors"] == [] and result["bad"] == 0
    assert isinstance(result["ok"], int) and result["ok"] > 2 * PER_CONNECTION  # it went on past a close


def test_a_close_without_saying_so_is_still_an_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer_once_then_drop() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY)
                conn.recv(65536)  # the next request, left unanswered

        thread = threading.Thread(target=answer_once_then_drop, daemon=True)
        thread.start()
        result = sink.run(port, "/blob", [], 200, len(BODY), connections=1, seconds=5.0)
        thread.join(timeout=10)
    assert result["ok"] == 1 and result["bad"] == 1
    assert result["errors"] == ["ConnectionError('closed before the response head')"]
