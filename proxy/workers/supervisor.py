"""The primary's front workers: started once it listens, restarted when one dies, stopped
before it stops (so that what they relay still finds it).

Each runs ``python -m proxy.workers`` with its orders on stdin (:mod:`.process`).
A worker that dies is started again after a pause that doubles with each quick death (up to
:data:`RESTART_MAX`), so a worker that cannot start does not spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Final

import structlog

from proxy.core.config import Settings
from proxy.workers.process import READY, Orders, encode

log = structlog.get_logger("ocicache.workers")

START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 30.0
RESTART_MIN: Final = 0.5
RESTART_MAX: Final = 30.0
# A worker that ran this long before dying died of something new: restart it promptly.
HEALTHY_AFTER: Final = 60.0


class Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self._socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready = False  # listening, its signal handlers in place
        self.quick_deaths = 0  # in a row, each within HEALTHY_AFTER of its start
        # Started ahead of its orders (:meth:`spawn`): importing takes most of a start.
        self._spawned: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def pause(self) -> float:
        """How long to wait before starting it again."""
        return float(min(RESTART_MIN * 2.0 ** max(0, self.quick_deaths - 1), RESTART_MAX))

    async def spawn(self) -> None:
        """Start the process; it imports what it needs, then waits for its orders. Raises
        OSError if it cannot be started (fork refused)."""
        self._spawned = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.workers",
            # Where the primary's socket will be: the worker removes the directory if the
            # primary dies (a kill -9) before or after giving it its orders.
            os.path.dirname(self._socket_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def start(self, orders: Orders) -> bool:
        """Give it its orders (spawning it first if need be) and wait until it listens; False
        if it did not within the time (it is then killed). Raises OSError if it cannot be
        started at all."""
        self.ready = False
        if self._spawned is None or self._spawned.returncode is not None:
            await self.spawn()
        proc, self._spawned = self._spawned, None
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.started = time.monotonic()
        proc.stdin.write(encode(orders))
        await proc.stdin.drain()
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        except TimeoutError:
            line = b""
        self.ready = line == READY
        if not self.ready:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # hung or broken: the watch sees it exit and tries again
        return self.ready

    def processes(self) -> list[asyncio.subprocess.Process]:
        return [p for p in (self.proc, self._spawned) if p is not None]


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        socket_path: str,
        event_loop: str,
        secret: str,
        on_exit: Callable[[int], None] = lambda index: None,
    ) -> None:
        self._settings = settings
        self._socket_path = socket_path
        self._event_loop = event_loop
        self._secret = secret
        self._on_exit = on_exit  # a worker (by index) is gone: what it reported is stale
        self._port = 0
        self.workers = [Worker(i, socket_path) for i in range(1, settings.processes)]
        self._stopping = False
        self._watches: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    @property
    def spawned_pids(self) -> list[int]:
        return [p.pid for w in self.workers for p in w.processes()]

    async def spawn(self) -> None:
        """Start the processes before the port is known: their imports then overlap the
        primary's own start-up (the catalogue's load), instead of following it."""
        for worker in self.workers:
            with contextlib.suppress(OSError):  # start() tries again, and says why
                await worker.spawn()

    async def start(self, port: int) -> None:
        """Workers listen on ``port`` too, once this returns (those that could start)."""
        self._port = port
        await asyncio.gather(*(self._start(w) for w in self.workers))
        loop = asyncio.get_running_loop()
        self._watches = [loop.create_task(self._watch(w), name=f"worker {w.index}") for w in self.workers]

    async def _start(self, worker: Worker) -> None:
        s = self._settings
        orders = Orders(s, self._socket_path, self._port, worker.index, self._secret, self._event_loop)
        try:
            ready = await worker.start(orders)
        except OSError as exc:
            worker.proc = None
            log.error("worker_not_started", index=worker.index, error=str(exc))
            return
        if ready:
            log.info("worker_started", index=worker.index, pid=worker.pid)
        else:
            log.error("worker_not_ready", index=worker.index, pid=worker.pid, timeout=START_TIMEOUT)

    async def _watch(self, worker: Worker) -> None:
        while not self._stopping:
            proc = worker.proc
            if proc is not None:
                code = await proc.wait()
                worker.ready = False
                self._on_exit(worker.index)
                if proc.stdin is not None:
                    proc.stdin.close()  # its pipe, not the next one's
                if self._stopping:
                    return
                healthy = time.monotonic() - worker.started > HEALTHY_AFTER
                worker.quick_deaths = 0 if healthy else worker.quick_deaths + 1
                log.warning(
                    "worker_exited", index=worker.index, pid=proc.pid, code=code, restart_in=worker.pause
                )
            else:
                worker.quick_deaths += 1  # could not even be started
            await asyncio.sleep(worker.pause)
            if self._stopping:
                return
            await self._start(worker)

    def signal(self, sig: int) -> None:
        """Pass ``sig`` on to the workers that are up: one still starting has no handler for
        it yet, and SIGHUP's default would end it."""
        for worker in self.workers:
            if worker.ready and worker.proc is not None and worker.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def stop(self) -> None:
        """Ask every worker to stop (they finish what is under way), then wait; kill what is
        left after :data:`STOP_TIMEOUT`."""
        self._stopping = True
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        procs = [p for w in self.workers for p in w.processes() if p.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # starting or not: it stops either way
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("worker_killed", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            if proc.stdin is not None:
                # Only now: its end tells a worker the primary is gone, not asked to stop.
                proc.stdin.close()
