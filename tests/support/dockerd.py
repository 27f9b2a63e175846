"""Run a private, real Docker daemon (Debian docker.io 20.10) for tests, as root.

Each instance is fully separate from the host and from other instances:

* its own ``--data-root`` (under the caller's workdir), ``--exec-root``,
  ``--pidfile`` and API socket (both in a short private dir under /tmp,
  because unix socket paths are limited to 108 bytes and pytest's tmp paths
  can be long);
* its own containerd: dockerd's *managed* containerd is used. With a private
  ``--exec-root`` dockerd writes that containerd's config to
  ``<exec-root>/containerd/containerd.toml`` with ``root`` under
  ``<data-root>/containerd/daemon``, ``state`` and the grpc, ttrpc and debug
  sockets under ``<exec-root>/containerd/``, CRI disabled and no TCP or
  metrics listener, so two daemons never share a containerd (verified with
  dockerd 20.10.24 / containerd 1.6.20);
* its own trust key: daemon.json sets ``deprecated-key-path`` so dockerd does
  not create /etc/docker/key.json.
  The one piece of shared state left is the empty directory
  /run/docker/plugins, which dockerd 20.10 always creates (plugin discovery);
  nothing is written into it.

Daemon flags: ``--storage-driver=vfs --iptables=false --bridge=none
--ip-masq=false`` (no kernel networking or overlay mounts needed) plus
``--config-file <workdir>/daemon.json`` holding ``registry-mirrors`` and
``insecure-registries``. Note dockerd always treats 127.0.0.0/8 as insecure.

No connections leave loopback. With ``block_external=True`` (the default) the
daemon and its managed containerd get ``HTTP_PROXY``/``HTTPS_PROXY`` pointing
at a loopback port that is bound but never listened on, and
``NO_PROXY=localhost,127.0.0.0/8,::1`` (Go never proxies loopback anyway).
So when dockerd falls back from a mirror to Docker Hub -- which dockerd 20.10
does whenever the mirror fails or lacks the image -- it fails at once with
``proxyconnect tcp: dial tcp 127.0.0.1:N: connect: connection refused``
instead of resolving registry-1.docker.io through the host's DNS server.

The CLI used is /usr/bin/docker (the 20.10 client from docker.io) when it
exists; on this machine a Docker 28 client sits earlier on PATH in
/usr/local/bin. The CLI gets a private, empty ``DOCKER_CONFIG`` so host
credentials or credential helpers are never consulted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

DOCKERD_BINARY = "/usr/sbin/dockerd"
DOCKER_CLI_CANDIDATES = ("/usr/bin/docker",)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
NO_PROXY = "localhost,127.0.0.0/8,::1"
_PROXY_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
)
_MNT_DETACH = 2


class DaemonStartError(RuntimeError):
    pass


class CommandError(subprocess.CalledProcessError):
    """A CalledProcessError whose message includes the command's output."""

    def __str__(self) -> str:
        parts = [super().__str__()]
        for name, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text = data if isinstance(data, str) else data.decode(errors="replace")
                parts.append(f"--- {name} (tail) ---\n{text[-4000:]}")
        return "\n".join(parts)


# --------------------------------------------------------------------------
# Helpers shared with containerd.py


class Blackhole:
    """A loopback TCP port that refuses every connection (bound, never listening)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()


def offline_env(blackhole: Blackhole | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with proxies forced to `blackhole` (if given)."""
    env = dict(os.environ)
    if blackhole is not None:
        for var in _PROXY_VARS:
            env.pop(var, None)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[var] = blackhole.url
        env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    if extra:
        env.update(extra)
    return env


def short_runtime_dir(prefix: str) -> Path:
    """A fresh private dir with a short path, for unix sockets."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def log_tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(lines[-n:])


def run_command(
    argv: Sequence[str], *, env: Mapping[str, str] | None, check: bool, timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        check=False,  # checked below, raising CommandError with the output
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=None if env is None else dict(env),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


def socket_accepts(path: Path) -> bool:
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, bounded wait, SIGKILL, bounded wait. No-op if it already exited."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout)


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pid_if(pid: int, cmdline_marker: str, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a process we did not spawn directly (e.g. a managed containerd).

    The cmdline must still contain `cmdline_marker`, so a recycled pid is left alone.
    """
    if cmdline_marker not in _pid_cmdline(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cmdline_marker not in _pid_cmdline(pid):
                return
            # Bounded poll of a foreign process's exit: we cannot wait() on a non-child.
            time.sleep(POLL_INTERVAL)


def _decode_mount_path(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out: list[str] = []
    i = 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(*roots: Path) -> list[Path]:
    """Mount points at or below any of `roots`, deepest first."""
    prefixes = [str(r.resolve()) for r in roots]
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) < 5:
                continue
            point = _decode_mount_path(fields[4])
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_under(*roots: Path) -> list[Path]:
    """Lazily unmount everything below `roots`; returns what was unmounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    done: list[Path] = []
    for point in mounts_under(*roots):
        if libc.umount2(str(point).encode(), _MNT_DETACH) == 0:
            done.append(point)
    return done


# --------------------------------------------------------------------------
# dockerd


def docker_cli() -> str:
    for candidate in DOCKER_CLI_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("docker")
    if found is None:
        raise FileNotFoundError("no docker CLI found")
    return found


class Dockerd:
    """A running private dockerd; see `start_dockerd`."""

    def __init__(
        self,
        *,
        proc: subprocess.Popen[bytes],
        workdir: Path,
        runtime_dir: Path,
        log_path: Path,
        blackhole: Blackhole | None,
        mirrors: Sequence[str],
        insecure_registries: Sequence[str],
    ) -> None:
        self.proc = proc
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.sock: Path = runtime_dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.exec_root = runtime_dir / "exec"
        self.data_root = workdir / "data"
        self.pidfile = runtime_dir / "docker.pid"
        self.log_path = log_path
        self.mirrors = tuple(mirrors)
        self.insecure_registries = tuple(insecure_registries)
        self.cli = docker_cli()
        self.docker_config = workdir / "cli-config"
        self.docker_config.mkdir(exist_ok=True)
        self._blackhole = blackhole
        self._containerd_pid: int | None = None
        self._stopped = False
        self._finalizer = weakref.finalize(self, _emergency_kill, proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def containerd_socket(self) -> Path:
        """The managed containerd's grpc socket (namespace "moby")."""
        return self.exec_root / "containerd" / "containerd.sock"

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log_path, n)

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker -H unix://<sock> ARGS...`; on failure with check, raise CommandError."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.docker_config)
        return run_command([self.cli, "-H", self.host, *args], env=env, check=check, timeout=timeout)

    def image_id(self, ref: str) -> str:
        return self.docker("image", "inspect", "--format", "{{.Id}}", ref, timeout=60).stdout.strip()

    def _remember_containerd(self) -> None:
        try:
            self._containerd_pid = int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            self._containerd_pid = None

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containerd), SIGKILL after a bounded wait,
        then make sure the managed containerd is gone, detach any mounts left under
        the data/exec roots and remove the short runtime dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._finalizer.detach()
        if self._containerd_pid is None:
            self._remember_containerd()
        try:
            stop_process(self.proc)
        finally:
            if self._containerd_pid is not None:
                kill_pid_if(self._containerd_pid, str(self.exec_root / "containerd"))
            unmount_under(self.data_root, self.runtime_dir)
            if self._blackhole is not None:
                self._blackhole.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _emergency_kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


def write_daemon_json(
    path: Path,
    *,
    mirrors: Sequence[str],
    insecure_registries: Sequence[str],
    key_path: Path,
    debug: bool,
    extra: Mapping[str, Any] | None = None,
) -> None:
    config: dict[str, Any] = {
        "registry-mirrors": list(mirrors),
        "insecure-registries": list(insecure_registries),
        # Without this dockerd 20.10 creates /etc/docker/key.json, shared by all daemons.
        "deprecated-key-path": str(key_path),
        "debug": debug,
    }
    if extra:
        config.update(extra)
    path.write_text(json.dumps(config, indent=2) + "\n")


def start_dockerd(
    workdir: Path,
    *,
    mirrors: Sequence[str] = (),
    insecure_registries: Sequence[str] = (),
    debug: bool = False,
    block_external: bool = True,
    daemon_json_extra: Mapping[str, Any] | None = None,
    start_timeout: float = START_TIMEOUT,
) -> Dockerd:
    """Start a private dockerd and wait until `docker info` answers.

    Data (vfs layers, image store) goes under `workdir/data` and is left there;
    the API socket is `Dockerd.sock` in a short /tmp dir removed on stop. The
    daemon log (with its managed containerd's) is `workdir/dockerd.log`.
    `mirrors` are URLs such as "http://127.0.0.1:5000"; they apply to Docker Hub
    names only (dockerd 20.10 has no per-registry mirrors).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runtime_dir = short_runtime_dir("ocd-")
    blackhole = Blackhole() if block_external else None
    config_path = workdir / "daemon.json"
    write_daemon_json(
        config_path,
        mirrors=mirrors,
        insecure_registries=insecure_registries,
        key_path=workdir / "key.json",
        debug=debug,
        extra=daemon_json_extra,
    )
    log_path = workdir / "dockerd.log"
    argv = [
        DOCKERD_BINARY,
        "--storage-driver=vfs",
        "--iptables=false",
        "--bridge=none",
        "--ip-masq=false",
        "--data-root",
        str(workdir / "data"),
        "--exec-root",
        str(runtime_dir / "exec"),
        "--pidfile",
        str(runtime_dir / "docker.pid"),
        "-H",
        f"unix://{runtime_dir / 'docker.sock'}",
        "--config-file",
        str(config_path),
    ]
    env = offline_env(blackhole)
    # dockerd would honour DOCKER_* variables (e.g. DOCKER_CERT_PATH); keep it to our flags.
    env = {k: v for k, v in env.items() if not k.startswith("DOCKER_")}
    try:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
                start_new_session=True,  # keep terminal signals (Ctrl-C) for us to handle
            )
    except BaseException:
        if blackhole is not None:
            blackhole.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        raise
    daemon = Dockerd(
        proc=proc,
        workdir=workdir,
        runtime_dir=runtime_dir,
        log_path=log_path,
        blackhole=blackhole,
        mirrors=mirrors,
        insecure_registries=insecure_registries,
    )
    try:
        _wait_ready(daemon, start_timeout)
    except BaseException:
        daemon.stop()
        raise
    daemon._remember_containerd()
    return daemon


def _wait_ready(daemon: Dockerd, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if daemon.proc.poll() is not None:
            raise DaemonStartError(
                f"dockerd exited with {daemon.proc.returncode} during startup; "
                f"log tail ({daemon.log_path}):\n{daemon.log_tail()}"
            )
        if socket_accepts(daemon.sock):
            remaining = max(1.0, min(15.0, deadline - time.monotonic()))
            try:
                res = daemon.docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=remaining)
            except subprocess.TimeoutExpired:
                last = "docker info timed out"
            else:
                if res.returncode == 0 and res.stdout.strip():
                    return
                last = (res.stderr or res.stdout).strip()
        if time.monotonic() >= deadline:
            raise DaemonStartError(
                f"dockerd not ready within {timeout}s (last docker info: {last!r}); "
                f"log tail ({daemon.log_path}):\n{daemon.log_tail()}"
            )
        # Bounded readiness polling of an external process (deadline above).
        time.sleep(POLL_INTERVAL)


@contextmanager
def running_dockerd(workdir: Path, **kw: Any) -> Iterator[Dockerd]:
    daemon = start_dockerd(workdir, **kw)
    try:
        yield daemon
    finally:
        daemon.stop()
