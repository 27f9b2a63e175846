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

Readiness and shutdown never poll. The daemon's output (its managed
containerd writes into the same pipe) is read by a `LoggedProcess`
(process.py): start_dockerd returns once dockerd logs "API listen on
<sock>" (level info, so with or without debug) and one ``docker info``
answers, and raises DaemonStartError with the log tail if it exits or the
deadline passes first. On stop, the managed containerd, which is not our
child, is waited for on a pidfd. `PrivateDaemon` and `launch` hold what this
fixture shares with containerd.py.

The CLI used is /usr/bin/docker (the 20.10 client from docker.io) when it
exists; on this machine a Docker 28 client sits earlier on PATH in
/usr/local/bin. The CLI gets a private, empty ``DOCKER_CONFIG`` so host
credentials or credential helpers are never consulted.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .process import LoggedProcess, stop_foreign

DOCKERD_BINARY = "/usr/sbin/dockerd"
DOCKER_CLI_CANDIDATES = ("/usr/bin/docker",)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
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


class PrivateDaemon(LoggedProcess):
    """What the dockerd and containerd fixtures share.

    The daemon runs in its own session with a short private runtime dir
    (sockets, state) that `stop()` removes after detaching any mounts left
    under it or `_mount_roots()`, and optionally behind a `Blackhole` proxy
    that `stop()` closes. Its output goes to `log_path` (appended) and to
    memory; it is ready once it logs `_ready_marker()` and `_confirm_ready()`
    finds it answering.
    """

    NAME: ClassVar[str]

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        runtime_dir: Path,
        log_path: Path,
        blackhole: Blackhole | None,
        env: Mapping[str, str],
    ) -> None:
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self._blackhole = blackhole
        super().__init__(
            argv,
            log_path=log_path,
            env=env,
            cwd=workdir,
            append=True,
            start_new_session=True,  # keep terminal signals (Ctrl-C) for us to handle
            stop_timeout=STOP_TIMEOUT,
        )

    def _ready_marker(self) -> str:
        raise NotImplementedError

    def _confirm_ready(self, timeout: float) -> str | None:
        """One request to the daemon; None if it answered, else what went wrong."""
        raise NotImplementedError

    def _mount_roots(self) -> tuple[Path, ...]:
        raise NotImplementedError

    def _fail(self, what: str) -> DaemonStartError:
        return DaemonStartError(f"{self.NAME} {what}; log tail ({self.log_path}):\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        marker = self._ready_marker()
        if not self.wait_for_line(marker, timeout):
            code = self.proc.poll()
            if code is not None:
                raise self._fail(f"exited with {code} during startup")
            raise self._fail(f"did not log {marker!r} within {timeout}s")
        try:
            problem = self._confirm_ready(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            problem = f"{' '.join(map(str, exc.cmd))} timed out after {exc.timeout:.0f}s"
        if problem is not None:
            raise self._fail(f"logged {marker!r} but {problem}")

    def _after_exit(self) -> None:
        try:
            unmount_under(*self._mount_roots(), self.runtime_dir)
        finally:
            if self._blackhole is not None:
                self._blackhole.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


D = TypeVar("D", bound=PrivateDaemon)


def launch(
    workdir: Path,
    spawn: Callable[[Path, Path, Blackhole | None], D],
    *,
    runtime_prefix: str,
    block_external: bool,
    start_timeout: float,
) -> D:
    """spawn(workdir, runtime_dir, blackhole) and wait until the daemon is ready.

    `workdir` is resolved and created; the runtime dir is a fresh short one
    under /tmp; everything is undone if spawning or readiness fails.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runtime_dir = short_runtime_dir(runtime_prefix)
    blackhole = Blackhole() if block_external else None
    try:
        daemon = spawn(workdir, runtime_dir, blackhole)
    except BaseException:
        if blackhole is not None:
            blackhole.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        raise
    try:
        daemon._wait_ready(start_timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon


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


class Dockerd(PrivateDaemon):
    """A running private dockerd; see `start_dockerd`."""

    NAME = "dockerd"

    def __init__(
        self,
        workdir: Path,
        runtime_dir: Path,
        blackhole: Blackhole | None,
        *,
        mirrors: Sequence[str],
        insecure_registries: Sequence[str],
        debug: bool,
        daemon_json_extra: Mapping[str, Any] | None,
    ) -> None:
        self.sock: Path = runtime_dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.exec_root = runtime_dir / "exec"
        self.data_root = workdir / "data"
        self.pidfile = runtime_dir / "docker.pid"
        self.mirrors = tuple(mirrors)
        self.insecure_registries = tuple(insecure_registries)
        self.cli = docker_cli()
        self.docker_config = workdir / "cli-config"
        self.docker_config.mkdir(exist_ok=True)
        self._containerd_pid: int | None = None
        config_path = workdir / "daemon.json"
        write_daemon_json(
            config_path,
            mirrors=mirrors,
            insecure_registries=insecure_registries,
            key_path=workdir / "key.json",
            debug=debug,
            extra=daemon_json_extra,
        )
        argv = [
            DOCKERD_BINARY,
            "--storage-driver=vfs",
            "--iptables=false",
            "--bridge=none",
            "--ip-masq=false",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "-H",
            self.host,
            "--config-file",
            str(config_path),
        ]
        # dockerd would honour DOCKER_* variables (e.g. DOCKER_CERT_PATH); keep it to our flags.
        env = {k: v for k, v in offline_env(blackhole).items() if not k.startswith("DOCKER_")}
        super().__init__(
            argv,
            workdir=workdir,
            runtime_dir=runtime_dir,
            log_path=workdir / "dockerd.log",
            blackhole=blackhole,
            env=env,
        )

    @property
    def containerd_socket(self) -> Path:
        """The managed containerd's grpc socket (namespace "moby")."""
        return self.exec_root / "containerd" / "containerd.sock"

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker -H unix://<sock> ARGS...`; on failure with check, raise CommandError."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_CONFIG"] = str(self.docker_config)
        return run_command([self.cli, "-H", self.host, *args], env=env, check=check, timeout=timeout)

    def image_id(self, ref: str) -> str:
        return self.docker("image", "inspect", "--format", "{{.Id}}", ref, timeout=60).stdout.strip()

    # dockerd 20.10 logs this (level info) once its API socket is serving.
    def _ready_marker(self) -> str:
        return f"API listen on {self.sock}"

    def _confirm_ready(self, timeout: float) -> str | None:
        res = self.docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=timeout)
        if res.returncode == 0 and res.stdout.strip():
            return None
        return f"docker info failed: {(res.stderr or res.stdout).strip()!r}"

    def _wait_ready(self, timeout: float) -> None:
        super()._wait_ready(timeout)
        self._remember_containerd()

    def _remember_containerd(self) -> None:
        try:
            self._containerd_pid = int((self.exec_root / "containerd" / "containerd.pid").read_text().strip())
        except (OSError, ValueError):
            self._containerd_pid = None

    def _mount_roots(self) -> tuple[Path, ...]:
        return (self.data_root,)

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containerd), SIGKILL after a bounded wait,
        then make sure the managed containerd is gone, detach any mounts left under
        the data/exec roots and remove the short runtime dir. Idempotent."""
        if self._containerd_pid is None and not self._stopped:
            self._remember_containerd()  # before dockerd can remove the pid file
        super().stop()

    def _after_exit(self) -> None:
        try:
            # Not our child: dockerd started it, and it shares dockerd's output pipe.
            if self._containerd_pid is not None:
                stop_foreign(self._containerd_pid, str(self.exec_root / "containerd"), STOP_TIMEOUT)
        finally:
            super()._after_exit()


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
    """Start a private dockerd; return once it logs "API listen on <sock>" and `docker info` answers.

    Data (vfs layers, image store) goes under `workdir/data` and is left there;
    the API socket is `Dockerd.sock` in a short /tmp dir removed on stop. The
    daemon log (with its managed containerd's) is `workdir/dockerd.log`.
    `mirrors` are URLs such as "http://127.0.0.1:5000"; they apply to Docker Hub
    names only (dockerd 20.10 has no per-registry mirrors).
    """

    def spawn(workdir: Path, runtime_dir: Path, blackhole: Blackhole | None) -> Dockerd:
        return Dockerd(
            workdir,
            runtime_dir,
            blackhole,
            mirrors=mirrors,
            insecure_registries=insecure_registries,
            debug=debug,
            daemon_json_extra=daemon_json_extra,
        )

    return launch(
        workdir, spawn, runtime_prefix="ocd-", block_external=block_external, start_timeout=start_timeout
    )


def running_dockerd(workdir: Path, **kw: Any) -> Dockerd:
    """start_dockerd(workdir, **kw) for a `with` block, which stops it on the way out."""
    return start_dockerd(workdir, **kw)
