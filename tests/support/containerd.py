"""Run a private, real containerd 1.6 (Debian) for tests, and drive it with `ctr`.

Each instance has its own config (version 2) with ``root`` under the caller's
workdir, ``state`` and the grpc socket (``<dir>/c.sock``, ttrpc at
``c.sock.ttrpc``) in a short private dir under /tmp, the ``opt`` plugin's path
private (default is the shared /opt/containerd), no debug/metrics listener,
and these plugins disabled: CRI (needs CNI, opens a streaming port) and the
aufs/btrfs/devmapper/zfs snapshotters (unavailable here; they only log noise).

start_containerd returns once containerd logs "containerd successfully
booted" and one ``ctr version`` answers (see `PrivateDaemon` in dockerd.py).

`Containerd.ctr()` runs ``ctr --address <sock> --namespace test ...``, with
``CONTAINERD_SNAPSHOTTER`` set to the instance's snapshotter ("native" by
default: plain directory copies, so unpacking never mounts anything; pass
snapshotter="overlayfs" to exercise overlay mounts, which also work here).

How ctr 1.6 uses a mirror (all verified against ctr/containerd 1.6.20)
---------------------------------------------------------------------
In 1.6 the *ctr process* resolves and fetches (the daemon only stores), so
hosts.toml is read by ctr, and only when ``--hosts-dir DIR`` is given (there
is no default directory for ctr; /etc/containerd/certs.d is a CRI setting)::

    ctr images pull --hosts-dir DIR docker.io/library/NAME:TAG
    ctr images pull --hosts-dir DIR --platform linux/arm64 docker.io/library/NAME:TAG
    ctr images pull --hosts-dir DIR --all-platforms docker.io/library/NAME:TAG

* ``DIR/<registry>/hosts.toml`` is looked up by the reference's host
  ("docker.io", "ghcr.io", "127.0.0.1:5000"), else ``DIR/_default/hosts.toml``.
* A ``[host."http://127.0.0.1:PORT"]`` entry is spoken to over plain HTTP
  because of its scheme; ``--plain-http`` is *not* needed for it. (``--plain-http``
  only changes the default scheme of hosts without a scheme / the fallback
  server; for a bare ``127.0.0.1:PORT/...`` reference ctr 1.6 falls back to
  HTTP for loopback by itself.)
* Requests to a mirror carry ``?ns=<registry>`` (e.g. ``?ns=docker.io``) on
  every manifest and blob request. The path is ``<url-path>/v2/<repo>/...``
  (``http://h:p/prefix`` gives ``/prefix/v2/library/x/...``); with
  ``override_path = true`` the URL path replaces ``/v2``:
  ``http://h:p/v2`` gives ``/v2/library/x/...`` and ``http://h:p/v2/ghcr.io``
  gives ``/v2/ghcr.io/library/x/...``.
* If every mirror fails (error or 404) ctr tries the registry's ``server``
  (default ``https://registry-1.docker.io`` for docker.io, ``https://<host>``
  otherwise). With ``block_external`` (default) that attempt goes to a
  refusing loopback proxy and fails at once with ``proxyconnect tcp: ...
  connection refused``; write_hosts_toml(server=...) can point it elsewhere.
* ``ctr images pull --http-dump`` prints every request and response, useful
  when debugging.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .dockerd import Blackhole, PrivateDaemon, launch, offline_env, run_command

CONTAINERD_BINARY = "/usr/bin/containerd"
CTR_BINARY = "/usr/bin/ctr"
NAMESPACE = "test"
START_TIMEOUT = 30.0
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)


def _toml_str(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


class Containerd(PrivateDaemon):
    """A running private containerd; see `start_containerd`."""

    NAME = "containerd"

    def __init__(
        self, workdir: Path, runtime_dir: Path, blackhole: Blackhole | None, *, snapshotter: str
    ) -> None:
        self.address: Path = runtime_dir / "c.sock"
        self.root = workdir / "root"
        self.state = runtime_dir / "state"
        self.config_path = workdir / "config.toml"
        self.namespace = NAMESPACE
        self.snapshotter = snapshotter
        write_config(
            self.config_path, root=self.root, state=self.state, address=self.address, opt=workdir / "opt"
        )
        super().__init__(
            [CONTAINERD_BINARY, "--config", str(self.config_path)],
            workdir=workdir,
            runtime_dir=runtime_dir,
            log_path=workdir / "containerd.log",
            blackhole=blackhole,
            env=offline_env(blackhole),
        )

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address <sock> --namespace test ARGS...`; raise CommandError on failure with check.

        ctr gets the same refusing proxy as the daemon, so a fallback to a real
        registry fails fast instead of touching DNS or the network.
        """
        env = offline_env(self._blackhole, {"CONTAINERD_SNAPSHOTTER": self.snapshotter})
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE"):
            env.pop(var, None)
        argv = [CTR_BINARY, "--address", str(self.address), "--namespace", self.namespace, *args]
        return run_command(argv, env=env, check=check, timeout=timeout)

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: Path | None = None,
        platforms: Sequence[str] = (),
        all_platforms: bool = False,
        plain_http: bool = False,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr images pull` with the flags documented in the module docstring."""
        args = ["images", "pull"]
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        for platform in platforms:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        return self.ctr(*args, ref, check=check, timeout=timeout)

    def image_refs(self) -> list[str]:
        return self.ctr("images", "ls", "-q", timeout=60).stdout.split()

    def image_target(self, ref: str) -> str:
        """Digest of the manifest/index the image `ref` points at."""
        for line in self.ctr("images", "ls", timeout=60).stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise KeyError(ref)

    def content_digests(self) -> set[str]:
        out = self.ctr("content", "ls", "-q", timeout=60).stdout
        return set(out.split())

    # containerd 1.6 logs this (level info) once its grpc and ttrpc sockets are serving.
    def _ready_marker(self) -> str:
        return "containerd successfully booted"

    def _confirm_ready(self, timeout: float) -> str | None:
        res = self.ctr("version", check=False, timeout=timeout)
        if res.returncode == 0 and "Server:" in res.stdout:
            return None
        return f"ctr version failed: {(res.stderr or res.stdout).strip()!r}"

    def _mount_roots(self) -> tuple[Path, ...]:
        return (self.root,)


def write_config(path: Path, *, root: Path, state: Path, address: Path, opt: Path) -> None:
    disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
    path.write_text(
        "version = 2\n"
        f"root = {_toml_str(str(root))}\n"
        f"state = {_toml_str(str(state))}\n"
        f"disabled_plugins = [{disabled}]\n"
        "\n[grpc]\n"
        f"  address = {_toml_str(str(address))}\n"
        "\n[ttrpc]\n"
        f"  address = {_toml_str(str(address) + '.ttrpc')}\n"
        "\n[debug]\n"
        '  address = ""\n'
        '  level = "info"\n'
        "\n[metrics]\n"
        '  address = ""\n'
        '\n[plugins."io.containerd.internal.v1.opt"]\n'
        f"  path = {_toml_str(str(opt))}\n"
    )


def start_containerd(
    workdir: Path,
    *,
    snapshotter: str = "native",
    block_external: bool = True,
    start_timeout: float = START_TIMEOUT,
) -> Containerd:
    """Start a private containerd; return once it logs that it booted and `ctr version` answers.

    Content and snapshots go under `workdir/root` (left there); the log is
    `workdir/containerd.log`; sockets and state live in a short /tmp dir that
    stop() removes.
    """

    def spawn(workdir: Path, runtime_dir: Path, blackhole: Blackhole | None) -> Containerd:
        return Containerd(workdir, runtime_dir, blackhole, snapshotter=snapshotter)

    return launch(
        workdir, spawn, runtime_prefix="octrd-", block_external=block_external, start_timeout=start_timeout
    )


def running_containerd(workdir: Path, **kw: Any) -> Containerd:
    """start_containerd(workdir, **kw) for a `with` block, which stops it on the way out."""
    return start_containerd(workdir, **kw)


def write_hosts_toml(
    hosts_dir: Path,
    registry: str,
    mirror_url: str,
    *,
    override_path: bool = False,
    capabilities: Sequence[str] = ("pull", "resolve"),
    skip_verify: bool = True,
    server: str | None = None,
) -> Path:
    """Write `hosts_dir/<registry>/hosts.toml` with one mirror host; returns its path.

    `registry` is the reference's host as containerd sees it ("docker.io",
    "ghcr.io", "127.0.0.1:5000") or "_default" for the catch-all. `mirror_url`
    is e.g. "http://127.0.0.1:5000" (plain HTTP by scheme) or, with
    `override_path`, a full API prefix such as "http://127.0.0.1:5000/v2/ghcr.io".
    `server`, if given, replaces the upstream ctr falls back to when the
    mirror fails. Overwrites an existing file.
    """
    if not registry or "/" in registry or registry in (".", ".."):
        raise ValueError(f"bad registry host for a hosts dir: {registry!r}")
    if "://" not in mirror_url:
        raise ValueError(f"mirror_url needs a scheme: {mirror_url!r}")
    lines = [f"# written by tests/support/containerd.py for {registry}"]
    if server is not None:
        lines.append(f"server = {_toml_str(server)}")
    lines += [
        "",
        f"[host.{_toml_str(mirror_url)}]",
        f"  capabilities = [{', '.join(_toml_str(c) for c in capabilities)}]",
        f"  skip_verify = {'true' if skip_verify else 'false'}",
    ]
    if override_path:
        lines.append("  override_path = true")
    path = Path(hosts_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
