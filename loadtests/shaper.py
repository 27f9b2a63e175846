"""A shaping TCP relay: the benchmarks' stand-in for a site's slow internet link.

A pull-through cache earns its keep when its upstream is behind a slow shared link (the site's
uplink) and its clients are on a fast LAN. On one machine everything is loopback, so the
benchmark puts this relay between the proxies and the upstream registry:

* every connection through the relay shares one token bucket per direction, as every download
  from the site shares its one uplink: at ``rate`` bytes/s total, not per connection;
* or, with ``per_connection``, each connection has buckets of its own: ``rate`` bytes/s per TCP
  stream, however many there are, as CDNs and long links cap each stream (a cache that fetches
  one blob over several connections then gets several times the rate);
* a relay reads from a socket only the bytes the bucket has granted (the count the kernel says
  is waiting, capped by the grant), so nothing queues in the relay: the excess waits in the
  sender's socket buffers and TCP flow control slows the sender, as on a real link;
* grants are at most ``chunk`` bytes and are handed out in arrival order, so concurrent
  downloads take turns and share the link roughly evenly.

It counts the bytes it relays in each direction, so a benchmark can check that the traffic it
measures went through the link. :class:`ShaperProcess` runs the relay in a child process
(``python -m loadtests.shaper``): its CPU then neither competes with nor gets charged to the
benchmark process, and it is measured on its own. Loopback only.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import fcntl
import json
import socket
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final, Literal, Self

from loadtests.procs import spawn_module

MB: Final = 1_000_000  # the link rate is in megabytes (10^6) per second, as links are sold

LOOPBACK: Final = "127.0.0.1"
STEP_TIMEOUT: Final = 30.0  # start-up and answers to commands
# A grant is about this much of the link's time: small enough that 20 downloads take turns
# every few milliseconds, large enough that the relay makes few system calls per byte.
GRANT_SECONDS: Final = 0.005
MIN_CHUNK: Final = 16 * 1024
MAX_CHUNK: Final = 1024 * 1024
# The bucket holds this many grants: a timer that fires late (asyncio.sleep overshoots by a
# millisecond or more) then leaves tokens in the bucket instead of losing them, so the link
# runs at its rate rather than a little under it.
BURST_GRANTS: Final = 4


Direction = Literal["down", "up"]


def chunk_for(rate: float) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, int(rate * GRANT_SECONDS)))


class TokenBucket:
    """``rate`` bytes/s, at most ``burst`` of them saved up, granted first come first served."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        # asyncio.Lock wakes its waiters in the order they came: the connections take turns.
        self._turn = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, want: int) -> int:
        """Wait until ``want`` bytes (at most ``burst``) may cross the link; returns the grant."""
        want = max(1, min(want, self.burst))
        async with self._turn:
            self._refill()
            while self._tokens < want:
                await asyncio.sleep((want - self._tokens) / self.rate)  # shaping
                self._refill()
            self._tokens -= want
        return want


@dataclass
class Counters:
    down: int = 0  # bytes from the target (the upstream) to the clients (the proxies)
    up: int = 0  # bytes from the clients to the target
    connections: int = 0  # accepted so far


def _waiting(sock: socket.socket) -> int:
    """Bytes the kernel holds for us on ``sock`` (FIONREAD); 0 at end of stream."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class Relay:
    """Listens on 127.0.0.1 and relays every connection to ``target`` through the two buckets."""

    def __init__(self, target: tuple[str, int], rate: float, *, per_connection: bool = False) -> None:
        if target[0] != LOOPBACK:
            raise ValueError("the relay only forwards to 127.0.0.1")
        self.target = target
        self.rate = rate
        self.per_connection = per_connection
        self.chunk = chunk_for(rate)
        self.counters = Counters()
        self._shared: dict[Direction, TokenBucket] | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._socks: set[socket.socket] = set()

    @property
    def port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.getsockname()[1]
        return port

    def buckets_for_connection(self) -> dict[Direction, TokenBucket]:
        """A new connection's two buckets (one per direction, as a link is full duplex): the
        link's own, shared by every connection, or with ``per_connection`` fresh ones."""
        burst = BURST_GRANTS * self.chunk
        if self.per_connection or self._shared is None:
            buckets: dict[Direction, TokenBucket] = {
                "down": TokenBucket(self.rate, burst),
                "up": TokenBucket(self.rate, burst),
            }
            if self.per_connection:
                return buckets
            self._shared = buckets
        return self._shared

    async def start(self) -> int:
        """Listen on an ephemeral port; returns it."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop())
        return self.port

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in list(self._socks):
            sock.close()
        self._socks.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            client, _ = await loop.sock_accept(self._listener)
            self.counters.connections += 1
            task = asyncio.create_task(self._serve(client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        self._socks.add(client)
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setblocking(False)
        self._socks.add(server)
        try:
            try:
                await loop.sock_connect(server, self.target)
            except OSError:
                return  # the client sees its connection closed, as when a link's far end is down
            for sock in (client, server):
                # The relay already sends in whole grants; Nagle would only add delay to heads.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buckets = self.buckets_for_connection()
            await asyncio.gather(
                self._pump(client, server, buckets["up"], "up"),
                self._pump(server, client, buckets["down"], "down"),
            )
        finally:
            for sock in (client, server):
                self._socks.discard(sock)
                sock.close()

    async def _pump(
        self, src: socket.socket, dst: socket.socket, bucket: TokenBucket, direction: Direction
    ) -> None:
        """Relay ``src`` to ``dst`` until ``src`` ends, reading only what ``bucket`` grants."""
        loop = asyncio.get_running_loop()
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        try:
            while True:
                # Wait for bytes before asking for a grant: a quiet keep-alive connection must
                # not sit on tokens that a busy one could use.
                await _readable(loop, src)
                waiting = _waiting(src)
                if waiting == 0:
                    # Readable with nothing waiting: the end of the stream (an empty peek), an
                    # error (the peek raises it), or bytes that arrived just now (go round).
                    try:
                        if src.recv_into(view[:1], 1, socket.MSG_PEEK) == 0:
                            break
                    except BlockingIOError:
                        pass
                    continue
                grant = await bucket.take(min(waiting, self.chunk))
                got = src.recv_into(view[:grant])
                if got == 0:
                    break
                # Counted on arrival, before it is passed on: by the time the receiver has a
                # byte, the counter includes it.
                if direction == "down":
                    self.counters.down += got
                else:
                    self.counters.up += got
                await loop.sock_sendall(dst, view[:got])
            # Pass the end of the stream on, and keep the other direction open (HTTP may still
            # be answering a request whose sender has finished sending).
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            # A reset on either side: drop both, as a link does when one end goes away.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# --- in a child process ------------------------------------------------------------------------


class ShaperError(RuntimeError):
    """The relay process did not start or broke its protocol."""


class ShaperProcess:
    """A :class:`Relay` in a child process, driven over its stdin and stdout, one line each:
    it prints ``listening PORT``; ``count`` is answered with ``count {counters as JSON}``; EOF on
    its stdin makes it close and exit, so it never outlives the benchmark that started it."""

    def __init__(self, target: tuple[str, int], rate: float, *, per_connection: bool = False) -> None:
        self.target = target
        self.rate = rate
        self.per_connection = per_connection
        self._proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://{LOOPBACK}:{self.port}"

    async def _line(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        async with asyncio.timeout(STEP_TIMEOUT):
            return (await self._proc.stdout.readline()).decode().strip()

    async def start(self) -> None:
        args = ["--target", f"{self.target[0]}:{self.target[1]}", "--rate", repr(self.rate)]
        if self.per_connection:
            args.append("--per-connection")
        self._proc = await spawn_module("loadtests.shaper", *args)
        self.pid = self._proc.pid
        head, _, port = (await self._line()).partition(" ")
        if head != "listening" or not port.isdigit():
            raise ShaperError(f"relay said {head} {port!r} where 'listening PORT' was due")
        self.port = int(port)

    async def counters(self) -> Counters:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(b"count\n")
        await self._proc.stdin.drain()
        head, _, rest = (await self._line()).partition(" ")
        if head != "count":
            raise ShaperError(f"relay said {head!r} where 'count' was due")
        return Counters(**json.loads(rest))

    async def close(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the relay's cue to close and exit
        try:
            await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _serve_commands(target: tuple[str, int], rate: float, per_connection: bool) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)

    def answer(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    async with Relay(target, rate, per_connection=per_connection) as relay:
        answer(f"listening {relay.port}")
        while line := await commands.readline():
            if line.strip() == b"count":
                answer("count " + json.dumps(asdict(relay.counters)))
            else:
                raise SystemExit(f"unknown command {line!r}")


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if host != LOOPBACK or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not {LOOPBACK}:PORT: {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.shaper", description=__doc__.split("\n")[0])
    p.add_argument("--target", type=_target, required=True, help="127.0.0.1:PORT to relay to")
    p.add_argument("--rate", type=float, required=True, help="bytes per second, each direction")
    p.add_argument(
        "--per-connection", action="store_true", help="the rate holds for each connection (default: for all)"
    )
    ns = p.parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve_commands(ns.target, ns.rate, ns.per_connection))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
