"""Run a real CNCF distribution (Debian `docker-registry` 2.8) for tests.

Each registry listens on 127.0.0.1 only, keeps its storage and config under
a work dir of its own, and writes combined stdout+stderr to `log_path`.
`LoggedProcess` (process.py) tees the output into that file and into memory,
so readiness and "has the registry logged this request yet" are waited for
on a condition variable rather than with sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .process import LoggedProcess

REGISTRY_BINARY = "docker-registry"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
Creds = tuple[str, str]  # (user, password)

# distribution logs through logrus in text format, e.g.
#   time="..." level=info msg="response completed" ... http.request.method=GET
#   http.request.uri="/v2/foo/blobs/sha256:..." ... http.response.status=200 ...
# Values are bare words or Go-quoted strings; logrus quotes only when needed.
_FIELD_RE = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')
# ...and, separately, gorilla's Apache combined access log, which is the only
# trace of requests that never reach the app handler (401 challenges, unknown
# routes): 127.0.0.1 - - [27/Nov/2026:22:59:39 +0000] "GET /v2/ HTTP/1.1" 401 87 "" "curl/7.88.1"
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>(?:[^"\\]|\\.)*) [^"]*" (?P<status>\d{3}) '
)
_BLOB_GET_RE = re.compile(r"^/v2/.+/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)(?:\?.*)?$")


@dataclass
class LoggedRequest:
    method: str
    path: str  # request URI as logged, query string included
    status: int
    request_id: str | None = None  # None for requests only in the access log


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_logrus_fields(line: str) -> dict[str, str]:
    return {k: _unquote(v) for k, v in _FIELD_RE.findall(line)}


class RequestParser:
    """Turns distribution log lines into requests, one line at a time.

    Handled requests log "response completed" (or "... with error") and then
    an access-log line; unauthenticated and unrouted ones log only the latter.
    Access lines are matched to earlier logrus entries by (method, uri,
    status) so each request is reported exactly once, in completion order.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str, int], int] = {}

    def feed(self, line: str) -> LoggedRequest | None:
        if 'msg="response completed' in line:
            f = parse_logrus_fields(line)
            try:
                method, uri = f["http.request.method"], f["http.request.uri"]
                req = LoggedRequest(method, uri, int(f["http.response.status"]), f.get("http.request.id"))
            except (KeyError, ValueError):
                return None
            key = (req.method, req.path, req.status)
            self._pending[key] = self._pending.get(key, 0) + 1
            return req
        if m := _ACCESS_RE.match(line):
            key = (m["method"], _unquote(f'"{m["uri"]}"'), int(m["status"]))
            if self._pending.get(key):
                self._pending[key] -= 1
                return None
            return LoggedRequest(*key)
        return None


def parse_requests(lines: list[str]) -> list[LoggedRequest]:
    parser = RequestParser()
    return [req for line in lines if (req := parser.feed(line)) is not None]


def count_blob_gets(requests: list[LoggedRequest], digest: str | None = None) -> int:
    """GET /v2/<name>/blobs/<digest> requests (any digest when None), any status."""
    matches = (_BLOB_GET_RE.match(r.path) for r in requests if r.method == "GET")
    return sum(1 for m in matches if m and digest in (None, m["digest"]))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RegistryStartError(RuntimeError):
    """The registry exited or never logged that it was listening."""


class Registry(LoggedProcess):
    """A running docker-registry process; see `start_registry`.

    Output handling, `lines()`, `log_tail()`, `wait_for()` and `stop()` come from
    `LoggedProcess`; this adds the requests parsed from the log as it arrives.
    """

    def __init__(
        self, argv: list[str], *, port: int, workdir: Path, log_path: Path, env: dict[str, str]
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.root = workdir / "storage"
        # Parsed as lines arrive so waiting on request counts stays cheap and
        # never holds the lock long enough to back-pressure the registry.
        self._requests: list[LoggedRequest] = []
        self._parser = RequestParser()
        super().__init__(argv, log_path=log_path, env=env, cwd=workdir, stop_timeout=STOP_TIMEOUT)

    def _on_line(self, line: str) -> None:
        if (req := self._parser.feed(line)) is not None:
            self._requests.append(req)

    def requests(self) -> list[LoggedRequest]:
        with self._cond:
            return list(self._requests)

    def blob_gets(self, digest: str | None = None) -> int:
        """GET /v2/<name>/blobs/<digest> requests logged so far, any status."""
        return count_blob_gets(self.requests(), digest)

    def wait_for_requests(
        self, predicate: Callable[[list[LoggedRequest]], bool], timeout: float = 10.0
    ) -> list[LoggedRequest]:
        """The registry may flush a response before logging it; wait for the log to catch up."""
        if not self.wait_until(lambda: predicate(self._requests), timeout):
            raise TimeoutError(f"log condition not met in {timeout}s; tail:\n{self.log_tail()}")
        return self.requests()


def _write_config(
    workdir: Path, port: int, htpasswd: Creds | None, proxy_remote: str | None, proxy_auth: Creds | None
) -> Path:
    root = workdir / "storage"
    config: dict[str, Any] = {
        "version": 0.1,
        # Request logging is what requests()/blob_gets() read: info level,
        # text format, access log explicitly on.
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            # Background purging would make logs and storage less predictable.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # Fixed secret: upload state survives a restart on the same workdir.
        "http": {"addr": f"127.0.0.1:{port}", "secret": "ocicache-test-secret"},
    }
    if htpasswd is not None:
        user, password = htpasswd
        # -B: bcrypt is the only hash distribution's htpasswd backend accepts.
        cmd = ["htpasswd", "-Bbn", user, password]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout
        htfile = workdir / "htpasswd"
        htfile.write_text(out.strip() + "\n")
        config["auth"] = {"htpasswd": {"realm": "ocicache-test", "path": str(htfile)}}
    if proxy_remote is not None:
        # 2.8 pings the remote at startup (and panics if it is down) and only
        # hands these credentials to Bearer-token realms: a Basic-auth
        # (htpasswd) remote never gets them, so proxied pulls fail (404/500).
        proxy: dict[str, str] = {"remoteurl": proxy_remote}
        if proxy_auth is not None:
            proxy["username"], proxy["password"] = proxy_auth
        config["proxy"] = proxy
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _spawn(workdir: Path, port: int, config: Path) -> Registry:
    log_path = workdir / "registry.log"
    if log_path.exists():
        # Keep the previous run's log for post-mortems of restart tests.
        log_path.replace(workdir / "registry.prev.log")
    # REGISTRY_* variables override the config file; don't let the caller's
    # environment change what we wrote.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    binary = shutil.which(REGISTRY_BINARY) or f"/usr/bin/{REGISTRY_BINARY}"
    argv = [binary, "serve", str(config)]
    return Registry(argv, port=port, workdir=workdir, log_path=log_path, env=env)


def start_registry(
    workdir: Path,
    *,
    port: int | None = None,
    htpasswd: Creds | None = None,
    proxy_remote: str | None = None,
    proxy_auth: Creds | None = None,
) -> Registry:
    """Start a registry serving `workdir/storage`; restart with the same workdir and port to reuse it."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # A port picked by free_port() can be taken before the registry binds it;
    # only then is a retry on another port meaningful.
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        config = _write_config(workdir, chosen, htpasswd, proxy_remote, proxy_auth)
        reg = _spawn(workdir, chosen, config)
        if reg.wait_for_line(f"listening on 127.0.0.1:{chosen}", START_TIMEOUT):
            # The listener is bound before that line is logged; one connect
            # confirms it really is ours and accepting.
            with socket.create_connection(("127.0.0.1", chosen), timeout=5):
                pass
            return reg
        reg.stop()
        tail = reg.log_tail()
        if "address already in use" in tail and attempt + 1 < attempts:
            continue
        raise RegistryStartError(
            f"docker-registry did not come up on 127.0.0.1:{chosen} within {START_TIMEOUT}s "
            f"(exit code {reg.proc.returncode}); log tail:\n{tail}"
        )
    raise AssertionError("unreachable")


def running_registry(workdir: Path, **kw: Any) -> Registry:
    """start_registry(workdir, **kw) for a `with` block, which stops it on the way out."""
    return start_registry(workdir, **kw)
