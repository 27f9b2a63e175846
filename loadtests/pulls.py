"""Many pulls of one blob at once, cheap enough on the client side that 100 of a 1 GiB blob fit
on this machine: ``python -m loadtests.pulls``.

One process, one thread, raw sockets and a selector: every connection is opened first, then
every request is sent at once (``GET``, ``Connection: close``). Three kinds of puller:

* **whole**: reads the body to its end and counts it, discarding the bytes in the kernel
  (``recv`` with ``MSG_TRUNC``: nothing is copied to this process), so that 90 GiB cost the
  client little more than the system calls;
* **verify** (the first ``--verify`` whole pullers): also copies the body and checks its sha256;
* **stalled**: reads the response head and a few bytes, then reads nothing more, holding its
  connection open until every whole puller is done: the proxy's send to it blocks.

A whole puller succeeds when its ``200``'s ``Content-Length`` bytes have all come; a
connection that ends sooner (a proxy aborting a bad or broken download) is reported as an
error, never counted as a pull. Everything is bounded by ``--timeout``. It prints one JSON
line: each puller's kind, status, bytes, time to first body byte and to its end, and error.
Loopback only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Final, Literal

LOOPBACK: Final = "127.0.0.1"
BUFSIZE: Final = 1024 * 1024
HEAD_MAX: Final = 64 * 1024
STALL_BYTES: Final = 4096  # what a stalled puller reads of the body before it stops
CONNECT_TIMEOUT: Final = 10.0

Kind = Literal["whole", "verify", "stalled"]


@dataclass
class Puller:
    kind: Kind
    sent: float = 0.0
    status: int = 0
    length: int | None = None
    received: int = 0
    first_byte: float | None = None
    done: float | None = None
    error: str | None = None
    head: bytearray = field(default_factory=bytearray, repr=False)
    hasher: hashlib._Hash | None = field(default=None, repr=False)

    @property
    def in_body(self) -> bool:
        return self.length is not None

    def result(self) -> dict[str, object]:
        out: dict[str, object] = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("head", "hasher")
        }
        out["ttfb"] = None if self.first_byte is None else self.first_byte - self.sent
        out["seconds"] = None if self.done is None else self.done - self.sent
        return out


def parse_head(head: bytes) -> tuple[int, int | None]:
    """Status and Content-Length of an HTTP/1.1 response head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return int(parts[1]), length


def request(path: str, port: int) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nUser-Agent: ocicache-loadtests-pulls\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode()


def run(
    port: int, path: str, *, size: int, digest: str, whole: int, stalled: int, verify: int, timeout: float
) -> list[Puller]:
    """Pull ``path`` from ``127.0.0.1:port`` with ``whole`` + ``stalled`` connections at once."""
    kinds: list[Kind] = ["verify" if i < verify else "whole" for i in range(whole)] + ["stalled"] * stalled
    pullers = [Puller(kind) for kind in kinds]
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    deadline = time.monotonic() + timeout
    try:
        for p in pullers:
            sock = socket.create_connection((LOOPBACK, port), timeout=CONNECT_TIMEOUT)
            socks.append(sock)
            if p.kind == "verify":
                p.hasher = hashlib.sha256()
        req = request(path, port)
        for p, sock in zip(pullers, socks, strict=True):
            p.sent = time.perf_counter()
            sock.sendall(req)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, (p, sock))
        # Until every whole puller is done and every stalled one has stopped where it stops.
        readers = len(pullers)
        while readers and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                p, sock = key.data
                finished = _step(p, sock, view)
                if finished or p.error is not None:
                    sel.unregister(sock)  # a stalled one's connection stays open, unread
                    readers -= 1
        for p in pullers:
            if p.kind != "stalled" and p.done is None and p.error is None:
                p.error = f"timed out after {timeout:g} s with {p.received} bytes"
            if p.kind == "stalled" and p.received == 0 and p.error is None:
                p.error = f"no response in {timeout:g} s"
        for p in pullers:
            if p.hasher is not None and p.done is not None and f"sha256:{p.hasher.hexdigest()}" != digest:
                p.error = f"bad body: sha256:{p.hasher.hexdigest()}"
            if p.kind != "stalled" and p.done is not None and p.received != size:
                p.error = f"{p.received} bytes, not {size}"
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    return pullers


def _step(p: Puller, sock: socket.socket, view: memoryview) -> bool:
    """Take what ``sock`` has for ``p``; True when ``p`` needs no more reading."""
    try:
        if not p.in_body:
            data = sock.recv(STALL_BYTES if p.kind == "stalled" else HEAD_MAX)
            if not data:
                p.error = "connection closed before the response head"
                return True
            p.head += data
            end = p.head.find(b"\r\n\r\n")
            if end < 0:
                if len(p.head) > HEAD_MAX:
                    p.error = "response head too long"
                return False
            p.status, p.length = parse_head(bytes(p.head[:end]))
            rest = bytes(p.head[end + 4 :])
            p.head.clear()
            if p.status != 200 or p.length is None:
                p.error = f"status {p.status}, Content-Length {p.length}"
                return True
            _count(p, rest)
        elif p.kind == "verify":
            got = sock.recv_into(view)
            if got == 0:
                return _ended(p)
            _count(p, view[:got])
        else:
            # MSG_TRUNC: the kernel drops the bytes instead of copying them to us.
            got = sock.recv_into(view, len(view), socket.MSG_TRUNC)
            if got == 0:
                return _ended(p)
            p.received += got
            if p.first_byte is None:
                p.first_byte = time.perf_counter()
    except BlockingIOError:
        return False
    except (OSError, ValueError) as exc:
        p.error = f"{type(exc).__name__}: {exc}"
        return True
    if p.kind == "stalled":
        return p.received >= 1  # then read nothing more
    assert p.length is not None
    if p.received >= p.length:
        p.done = time.perf_counter()
        return True
    return False


def _count(p: Puller, data: bytes | memoryview) -> None:
    if not data:
        return
    if p.first_byte is None:
        p.first_byte = time.perf_counter()
    p.received += len(data)
    if p.hasher is not None:
        p.hasher.update(data)


def _ended(p: Puller) -> bool:
    p.error = f"connection ended after {p.received} of {p.length} bytes"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.pulls", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--size", type=int, required=True, help="the blob's size")
    ap.add_argument("--digest", required=True, help="sha256:… of the blob, for the verifying pullers")
    ap.add_argument("--whole", type=int, default=1)
    ap.add_argument("--stalled", type=int, default=0)
    ap.add_argument("--verify", type=int, default=1, help="how many whole pullers check the sha256")
    ap.add_argument("--timeout", type=float, default=300.0)
    ns = ap.parse_args(argv)
    if not (1 <= ns.whole <= 500 and 0 <= ns.stalled <= 500 and 0 < ns.timeout <= 3600):
        ap.error("--whole 1..500, --stalled 0..500, --timeout up to 3600 s")
    pullers = run(
        ns.port,
        ns.path,
        size=ns.size,
        digest=ns.digest,
        whole=ns.whole,
        stalled=ns.stalled,
        verify=min(ns.verify, ns.whole),
        timeout=ns.timeout,
    )
    sys.stdout.write(json.dumps([p.result() for p in pullers]) + "\n")
    return 0 if all(p.error is None for p in pullers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
