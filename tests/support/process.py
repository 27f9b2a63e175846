"""Child processes whose output tests wait on, and stopping processes without sleeps.

`LoggedProcess` runs a command with stdout and stderr on one pipe. A reader
thread tees every line into a log file and into memory and wakes waiters on
a condition variable, so "has it logged X yet" is waited for with a
deadline, never polled. The same thread watches a pidfd of the child, so a
waiter also wakes when the child exits even if a grandchild it started
(dockerd's managed containerd) keeps the pipe open.

`stop_foreign` stops a process we did not spawn, and so cannot wait() on, by
polling a pidfd of it (Linux 5.3+).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

DEFAULT_STOP_TIMEOUT = 10.0
_READ_SIZE = 65536


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, bounded wait, SIGKILL, bounded wait. No-op if it already exited."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout)


def _kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout)


def pidfd_exited(pidfd: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the process behind `pidfd` to exit; True once it has.

    A pidfd polls readable when its process exits (zombies included).
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_foreign(pid: int, cmdline_marker: str, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stop a process that is not our child (e.g. a managed containerd): SIGTERM, wait, SIGKILL, wait.

    The process is pinned with a pidfd before its cmdline is checked for
    `cmdline_marker`, and signalled through that pidfd, so a recycled pid is
    never signalled. Returns True when the process is gone (or was never ours).
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        # Alive after the cmdline read means the pid was this process's all along.
        if cmdline_marker not in _pid_cmdline(pid) or pidfd_exited(pidfd, 0):
            return True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            if pidfd_exited(pidfd, timeout):
                return True
        return False
    finally:
        os.close(pidfd)


class LoggedProcess:
    """A child process whose combined output is teed to `log_path` and kept as lines.

    Subclasses can override `_on_line` (called with the lock held, for every
    line in order) to parse output as it arrives, and `_after_exit` (called by
    `stop` once the process is gone, before the output is released).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        append: bool = False,
        start_new_session: bool = False,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self._lines: list[str] = []
        self._cond = threading.Condition()
        # The child exited and all it wrote has been read, or the pipe hit EOF:
        # waiting for more output would be waiting for nothing.
        self._finished = False
        self._stopped = False
        self._log_file = log_path.open("a" if append else "w", encoding="utf-8")
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,  # one pipe keeps the two streams in order
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=start_new_session,
            )
        except BaseException:
            self._log_file.close()
            raise
        try:
            # Nothing can have reaped the child yet, so the pid is still its own.
            self._pidfd = os.pidfd_open(self.proc.pid)
        except BaseException:
            _kill(self.proc, stop_timeout)
            self._log_file.close()
            raise
        # Never leave an orphan behind if a test forgets stop().
        self._finalizer = weakref.finalize(self, _kill, self.proc, stop_timeout)
        self._reader = threading.Thread(
            target=self._pump, name=f"{Path(argv[0]).name}-{self.proc.pid}", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- reader thread

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        output_only = select.poll()
        output_only.register(out, select.POLLIN)
        poller = select.poll()
        poller.register(out, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        partial = b""
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if out in ready:
                    chunk = os.read(out, _READ_SIZE)
                    if not chunk:
                        break
                    *complete, partial = (partial + chunk).split(b"\n")
                    self._add(complete)
                elif self._pidfd in ready:
                    # The child has exited, so whatever it wrote is in the pipe by now:
                    # only when a fresh look finds nothing to read has all of it been read.
                    if not output_only.poll(0):
                        poller.unregister(self._pidfd)
                        if partial:  # the child's last line, unterminated
                            self._add([partial])
                            partial = b""
                        with self._cond:
                            self._finished = True
                            self._cond.notify_all()
        finally:
            try:
                if partial:
                    self._add([partial])
            finally:
                with self._cond:
                    self._finished = True
                    self._cond.notify_all()

    def _add(self, raw_lines: list[bytes]) -> None:
        lines = [raw.decode("utf-8", errors="replace").rstrip("\r") for raw in raw_lines]
        if not lines:
            return
        self._log_file.write("".join(line + "\n" for line in lines))
        self._log_file.flush()
        with self._cond:
            for line in lines:
                self._lines.append(line)
                self._on_line(line)
            self._cond.notify_all()

    def _on_line(self, line: str) -> None:
        """Hook: each output line, in order, with the lock held."""

    # -- reading and waiting

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def log_tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(self._lines[-n:])

    def wait_until(self, check: Callable[[], bool], timeout: float) -> bool:
        """Block until check() (run with the lock held) is true, the process has exited
        and its output is read, or `timeout` seconds pass; returns check()."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check():
                remaining = deadline - time.monotonic()
                if self._finished or remaining <= 0:
                    return check()
                self._cond.wait(remaining)
            return True

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 10.0) -> bool:
        """Block until predicate(all output lines so far) is true, the process has exited, or timeout."""
        return self.wait_until(lambda: predicate(self._lines), timeout)

    def wait_for_line(self, marker: str, timeout: float) -> bool:
        """Block until a line containing `marker` is logged (False on exit or timeout)."""
        seen = 0

        def found() -> bool:
            nonlocal seen  # each line is looked at once, however often the waiter wakes
            new, seen = self._lines[seen:], len(self._lines)
            return any(marker in line for line in new)

        return self.wait_until(found, timeout)

    # -- stopping

    def _after_exit(self) -> None:
        """Hook: cleanup once the process is gone (it may still hold grandchildren)."""

    def stop(self) -> None:
        """SIGTERM, bounded wait, SIGKILL if needed; then release the output. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._finalizer.detach()
        try:
            terminate(self.proc, self.stop_timeout)
        finally:
            try:
                self._after_exit()
            finally:
                self._release_output()

    def _release_output(self) -> None:
        self._reader.join(self.stop_timeout)
        if self._reader.is_alive():  # a grandchild still holds the pipe; leave the thread its files
            return
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log_file.close()
        os.close(self._pidfd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
