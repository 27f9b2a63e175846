"""The servers a scenario starts, each a real process listening on 127.0.0.1.

* ocicache: ``python -m proxy serve`` as a subprocess, logging as it does by default (info, JSON)
  into a file; with ``follow_log`` its output comes through a pipe instead, so that a scenario
  can wait for a log event (a fill's commit) rather than sleep;
* CNCF distribution (Debian's ``docker-registry``), as an upstream registry or as a pull-through
  proxy in front of one;
* nginx: a private ``nginx-light`` instance (own prefix and config, ``daemon off``);
* bare: :mod:`loadtests.bare`, an aiohttp handler that returns fixed bytes, the floor under any
  aiohttp server's cost per request.

Each :class:`Server` knows its processes (nginx's workers, any child), so that the harness can
measure their CPU and place them on cores, and it says how it was configured, for the report.
Everything it starts it stops by process id, never by name.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import aiohttp
import yaml

from loadtests.sampling import descendants, process_table
from tests.support.process import LoggedProcess, terminate

ROOT: Final = Path(__file__).resolve().parent.parent
LOOPBACK: Final = "127.0.0.1"
NGINX: Final = "/usr/sbin/nginx"
REGISTRY: Final = "docker-registry"
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0
PORT_TRIES: Final = 3
# Readiness of servers that print nothing when they listen (nginx, a quiet registry): a bounded
# series of connection attempts this far apart.
CONNECT_RETRY: Final = 0.05

_LISTENING_RE: Final = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
_BARE_RE: Final = re.compile(r"^listening (\d+)$", re.MULTILINE)


class ServerError(RuntimeError):
    """A server did not start, or exited while it was needed."""


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    settings: str  # how it runs, in words, for the report
    _stop: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server's processes: its own and every one below it (nginx's workers)."""
        return sorted(descendants(process_table(), self.proc.pid))

    def url(self, path: str = "") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ServerError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")

    def stop(self) -> None:
        self._stop()

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> bool:
    """True once ``port`` accepts connections; False if ``proc`` exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
        time.sleep(CONNECT_RETRY)  # bounded by the deadline; nothing to wait on instead
    return False


def _popen(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
    stdout_pipe: bool = False,
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    out = log.open("ab")
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else out,
            stderr=out,
            env=None if env is None else dict(env),
            cwd=cwd,
        )
    except BaseException:
        out.close()
        raise
    return proc, out


def _stopper(proc: subprocess.Popen[bytes], *files: IO[bytes]) -> Callable[[], None]:
    def stop() -> None:
        try:
            terminate(proc, STOP_TIMEOUT)
        finally:
            for f in files:
                f.close()

    return stop


def _read_line_matching(proc: subprocess.Popen[bytes], pattern: re.Pattern[str], timeout: float) -> str:
    """Read ``proc``'s stdout until a line matches; returns what was read (empty on failure)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not pattern.search(seen.decode(errors="replace")):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return ""
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return ""
            seen += chunk
    return seen.decode(errors="replace")


def _drain_into(stream: IO[bytes], log: Path) -> threading.Thread:
    """Keep reading a child's stdout into its log, so that a full pipe never blocks it."""

    def pump() -> None:
        with log.open("ab") as out:
            while chunk := os.read(stream.fileno(), 65536):
                out.write(chunk)
                out.flush()

    thread = threading.Thread(target=pump, name=f"drain-{log.name}", daemon=True)
    thread.start()
    return thread


def _clean_env(prefix: str) -> dict[str, str]:
    # Settings from the caller's environment (OCICACHE_*, REGISTRY_*) would override the flags
    # and config files written here, and make runs incomparable.
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- ocicache ----------------------------------------------------------------------------------


class FollowedServer(Server):
    """A server whose output the harness reads line by line (see :func:`start_ocicache`)."""

    logged: LoggedProcess

    def events(self, name: str) -> int:
        """How many JSON log lines with ``"event": name`` it has written so far."""
        return _count_events(self.logged.lines(), name)

    def wait_events(self, name: str, count: int, timeout: float) -> bool:
        return self.logged.wait_for(lambda lines: _count_events(lines, name) >= count, timeout)

    def event_fields(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """Every JSON log line whose event is one of ``names``, in order."""
        found = []
        for line in self.logged.lines():
            fields = _json_line(line)
            if fields is not None and fields.get("event") in names:
                found.append(fields)
        return found


def _json_line(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    with contextlib.suppress(ValueError):
        fields = json.loads(line)
        if isinstance(fields, dict):
            return fields
    return None


def _count_events(lines: list[str], name: str) -> int:
    marker = f'"{name}"'
    return sum(1 for line in lines if marker in line and (_json_line(line) or {}).get("event") == name)


def ocicache_argv(cache_dir: Path, upstreams: Mapping[str, str], extra: Sequence[str]) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--listen",
        f"{LOOPBACK}:0",
        "--cache-dir",
        str(cache_dir),
    ]
    for name, url in upstreams.items():
        argv += ["--upstream", f"{name}={url}"]
    return [*argv, *extra]


def start_ocicache(
    workdir: Path,
    upstreams: Mapping[str, str],
    *extra: str,
    name: str = "ocicache",
    follow_log: bool = False,
    cache_dir: Path | None = None,
) -> Server:
    """``python -m proxy serve`` with its cache in ``workdir/cache`` (or ``cache_dir``).

    Logging is left at ocicache's defaults (info, JSON, one line per request) unless ``extra``
    says otherwise: the figures are those of the proxy as deployed. Without ``follow_log`` the log
    goes straight to a file, so reading it costs the harness nothing while it measures.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir if cache_dir is not None else workdir / "cache"
    argv = ocicache_argv(cache, upstreams, extra)
    log = workdir / f"{name}.log"
    settings = "python -m proxy serve " + " ".join(extra) if extra else "python -m proxy serve, defaults"
    env = _clean_env("OCICACHE_")
    if follow_log:
        logged = LoggedProcess(argv, log_path=log, env=env, cwd=ROOT, stop_timeout=STOP_TIMEOUT)
        followed = FollowedServer(name, 0, logged.proc, log, settings, logged.stop)
        followed.logged = logged
        found: list[int] = []

        def listening(lines: list[str]) -> bool:
            for line in lines:
                if m := _LISTENING_RE.search(line):
                    found.append(int(m[1]))
                    return True
            return False

        if not logged.wait_for(listening, START_TIMEOUT):
            logged.stop()
            raise ServerError(f"{name} did not start: {logged.log_tail()}")
        followed.port = found[0]
        return followed
    proc, out = _popen(argv, log, env=env, stdout_pipe=True)
    server = Server(name, 0, proc, log, settings, _stopper(proc, out))
    seen = _read_line_matching(proc, _LISTENING_RE, START_TIMEOUT)
    if (m := _LISTENING_RE.search(seen)) is None:
        server.stop()
        raise ServerError(f"{name} did not start: {seen!r} {server.log_tail()}")
    assert proc.stdout is not None
    _drain_into(proc.stdout, log)
    server.port = int(m[1])
    return server


# --- nginx -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NginxSettings:
    workers: int = 2
    sendfile: bool = True
    access_log: bool = False

    def describe(self) -> str:
        return (
            f"{self.workers} worker{'s' if self.workers != 1 else ''}, sendfile "
            f"{'on' if self.sendfile else 'off'}, tcp_nopush on, access log "
            f"{'on' if self.access_log else 'off'}"
        )


def nginx_conf(prefix: Path, docroot: Path, port: int, settings: NginxSettings) -> str:
    # Temp paths inside the prefix: the compiled-in ones are the system instance's.
    temps = "\n".join(
        f"  {kind}_temp_path {prefix / ('tmp-' + kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # A master run as root drops its workers to "nobody", who may not be able to reach the
    # document root (pytest's temp dirs are 0700, for one). The workers serve only our own file
    # on loopback, so they keep the identity of whoever runs the harness.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    access = f"access_log {prefix / 'access.log'};" if settings.access_log else "access_log off;"
    return f"""\
{user}worker_processes {settings.workers};
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
  {access}
  sendfile {"on" if settings.sendfile else "off"};
  tcp_nopush on;
  # The Range workload makes thousands of requests per connection; the default (1000) would
  # make nginx, and only nginx, pay for reconnecting.
  keepalive_requests 100000000;
  keepalive_timeout 75s;
  default_type application/octet-stream;
{temps}
  server {{
    listen {LOOPBACK}:{port};
    root {docroot};
  }}
}}
"""


def nginx_version() -> str:
    done = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False, timeout=30)
    return done.stderr.strip().removeprefix("nginx version: ")


def start_nginx(
    prefix: Path, docroot: Path, settings: NginxSettings | None = None, name: str = "nginx"
) -> Server:
    """nginx serving ``docroot``; ready once its workers exist."""
    if not Path(NGINX).exists():
        raise ServerError(f"{NGINX} is not installed (apt-get install nginx-light)")
    settings = settings or NginxSettings()
    prefix.mkdir(parents=True, exist_ok=True)
    log = prefix / "error.log"
    last = ""
    # The port is chosen before nginx binds it; another process may take it in between.
    for _ in range(PORT_TRIES):
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, docroot, port, settings))
        proc, out = _popen([NGINX, "-e", str(log), "-c", str(conf), "-p", str(prefix)], prefix / "stderr.log")
        server = Server(
            name, port, proc, log, f"nginx {nginx_version()}, {settings.describe()}", _stopper(proc, out)
        )
        if wait_listening(port, proc):
            # Workers fork right after the master binds; the harness places and measures them.
            deadline = time.monotonic() + START_TIMEOUT
            while len(server.pids()) < 1 + settings.workers and time.monotonic() < deadline:
                time.sleep(CONNECT_RETRY)
            return server
        server.stop()
        last = server.log_tail()
    raise ServerError(f"nginx did not start: {last}")


# --- CNCF distribution -------------------------------------------------------------------------


def registry_version() -> str:
    binary = shutil.which(REGISTRY) or f"/usr/bin/{REGISTRY}"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return done.stdout.strip().rpartition(" ")[2] or "?"


def registry_config(root: Path, port: int, remote: str | None, quiet: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 0.1,
        # Quiet: warnings only and no access log, so that a server answering thousands of
        # requests a second does not spend its time (and the disk's) logging them.
        "log": {
            "level": "warn" if quiet else "info",
            "formatter": "text",
            "accesslog": {"disabled": quiet},
        },
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": "ocicache-bench-secret"},
    }
    if remote is not None:
        # distribution 2.8 pings the remote when it starts, and exits if it cannot reach it.
        config["proxy"] = {"remoteurl": remote}
    return config


def start_distribution(
    workdir: Path, *, remote: str | None = None, quiet: bool = True, name: str = "distribution"
) -> Server:
    """docker-registry storing under ``workdir/storage``; a pull-through proxy of ``remote`` if
    given. Ready once it accepts connections (a quiet registry does not log that it listens)."""
    binary = shutil.which(REGISTRY)
    if binary is None:
        raise ServerError(f"{REGISTRY} is not installed (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    kind = f"pull-through proxy of {remote}" if remote is not None else "registry"
    logs = "warnings only, no access log" if quiet else "info and access log"
    settings = f"docker-registry {registry_version()}, {kind}, filesystem storage, {logs}"
    last = ""
    for _ in range(PORT_TRIES):
        port = free_port()
        config = workdir / "config.yml"
        config.write_text(yaml.safe_dump(registry_config(workdir / "storage", port, remote, quiet)))
        proc, out = _popen(
            [binary, "serve", str(config)], workdir / "registry.log", env=_clean_env("REGISTRY_"), cwd=workdir
        )
        server = Server(name, port, proc, workdir / "registry.log", settings, _stopper(proc, out))
        if wait_listening(port, proc):
            return server
        server.stop()
        last = server.log_tail()
    raise ServerError(f"{REGISTRY} did not start: {last}")


def distribution_blob_file(server_root: Path, digest: str) -> Path:
    """Where distribution's filesystem driver keeps a blob's bytes."""
    algo, _, hexa = digest.partition(":")
    return server_root / "storage" / "docker/registry/v2/blobs" / algo / hexa[:2] / hexa / "data"


# --- the bare handler --------------------------------------------------------------------------


def start_bare(workdir: Path, body: bytes, headers: Mapping[str, str], name: str = "bare aiohttp") -> Server:
    """:mod:`loadtests.bare` answering every GET with ``body`` and ``headers``."""
    workdir.mkdir(parents=True, exist_ok=True)
    body_file, headers_file = workdir / "body", workdir / "headers.json"
    body_file.write_bytes(body)
    headers_file.write_text(json.dumps(dict(headers)))
    argv = [sys.executable, "-m", "loadtests.bare", "--body", str(body_file), "--headers", str(headers_file)]
    log = workdir / "bare.log"
    proc, out = _popen(argv, log, env=_clean_env("OCICACHE_"), stdout_pipe=True)
    server = Server(
        name,
        0,
        proc,
        log,
        f"aiohttp {aiohttp.__version__} on uvloop, one handler, no middleware",
        _stopper(proc, out),
    )
    seen = _read_line_matching(proc, _BARE_RE, START_TIMEOUT)
    if (m := _BARE_RE.search(seen)) is None:
        server.stop()
        raise ServerError(f"{name} did not start: {seen!r} {server.log_tail()}")
    assert proc.stdout is not None
    _drain_into(proc.stdout, log)
    server.port = int(m[1])
    return server
