"""Debian's redis-server for tests: on a loopback port of its own, no persistence, stopped and
started again on the same port (the replicas' "Redis is down, and back" tests)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Self

from .process import LoggedProcess
from .registry import free_port

REDIS_BINARY = "redis-server"
START_TIMEOUT = 30.0


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        if shutil.which(REDIS_BINARY) is None:
            raise RuntimeError(f"{REDIS_BINARY} is not installed (scripts/test.sh installs it)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: LoggedProcess | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.proc.poll() is not None, "already running"
        self._starts += 1
        argv = [
            REDIS_BINARY,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
        ]
        self.proc = LoggedProcess(argv, log_path=self.workdir / f"redis-{self._starts}.log")
        if not self.proc.wait_for_line("Ready to accept connections", START_TIMEOUT):
            tail = self.proc.log_tail()
            self.proc.stop()
            raise RuntimeError(f"redis-server did not start on 127.0.0.1:{self.port}:\n{tail}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=5):
            pass

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: Redis gone mid-command, as a crash would leave it."""
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.kill()
            self.proc.proc.wait(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
