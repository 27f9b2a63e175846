"""Client configuration for pulling through this proxy, served at ``GET /setup/<client>``.

Each generator is a pure function of the proxy's address (``host:port``, as clients reach it)
and the configured registry names; the one handler only picks the address out of the request
and the registry out of the query. Every output is a complete file for its client:

* ``/setup/docker``: ``daemon.json`` (Docker mirrors Docker Hub only);
* ``/setup/containerd?registry=R[&override_path=1]``: ``certs.d/R/hosts.toml`` (``R`` a
  configured upstream, or ``_default`` for the catch-all);
* ``/setup/registries.conf``: CRI-O, podman, skopeo, buildah;
* ``/setup/buildkitd.toml``: BuildKit;
* ``/setup/k3s``: k3s/RKE2 ``registries.yaml``.

Over plain HTTP every file marks the proxy as such; with ``tls:`` configured each names it
by ``https://`` and marks nothing insecure, and says where a private CA would go.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from aiohttp import web

from proxy.core.errors import Code, OciError
from proxy.core.routing import DOCKER_HUB
from proxy.web import keys
from proxy.web.address import reached_at

DEFAULT_DIR: Final = "_default"
# The endpoint containerd falls back to when the mirror fails: the registry's own API host.
# Docker Hub's API is not at its name.
_REAL_ENDPOINT: Final = {DOCKER_HUB: "https://registry-1.docker.io"}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


def _q(value: str) -> str:
    """A quoted string for TOML and YAML alike (JSON's escapes are valid in both)."""
    return json.dumps(value)


def docker_daemon_json(proxy: str, upstreams: Sequence[str], *, tls: bool = False) -> str:
    """``/etc/docker/daemon.json``. The daemon sends Docker Hub names without naming the
    registry, so they reach the default upstream, which therefore has to be Docker Hub."""
    if not upstreams or upstreams[0] != DOCKER_HUB:
        raise OciError(
            Code.NAME_UNKNOWN,
            "Docker mirrors only Docker Hub, and docker.io is not this proxy's default upstream",
            {"default": upstreams[0] if upstreams else None},
        )
    doc: dict[str, list[str]] = {"registry-mirrors": [f"{_scheme(tls)}://{proxy}"]}
    if not tls:
        doc["insecure-registries"] = [proxy]
    return json.dumps(doc, indent=2) + "\n"


def containerd_hosts_toml(
    proxy: str, registry: str, upstreams: Sequence[str], *, override_path: bool, tls: bool = False
) -> str:
    """``<config_path>/<registry>/hosts.toml``. containerd adds ``?ns=<registry>`` to every
    request to a mirror, which is how the proxy picks the upstream; the path form
    (``override_path``) names it in the URL instead, for setups that strip queries."""
    if registry != DEFAULT_DIR and registry not in upstreams:
        raise OciError(
            Code.NAME_UNKNOWN, "registry not configured on this proxy", {"registry": registry[:100]}
        )
    if registry == DEFAULT_DIR and override_path:
        raise OciError(Code.NAME_INVALID, "the path form needs a registry name; _default stands for any")
    what = "every registry without a directory of its own" if registry == DEFAULT_DIR else registry
    lines = [f"# {registry}/hosts.toml: pull {what} through ocicache at {proxy}"]
    if registry != DEFAULT_DIR:
        # Where containerd goes when the proxy fails or lacks the image.
        lines.append(f"server = {_q(_REAL_ENDPOINT.get(registry, f'https://{registry}'))}")
    url = f"{_scheme(tls)}://{proxy}" + (f"/v2/{registry}" if override_path else "")
    lines += ["", f"[host.{_q(url)}]", '  capabilities = ["pull", "resolve"]']
    if override_path:
        lines.append("  override_path = true")
    if tls:
        lines.append(f"  # ca = {_q(f'/etc/containerd/certs.d/{registry}/ocicache-ca.crt')}  # a private CA")
    return "\n".join(lines) + "\n"


def registries_conf(proxy: str, upstreams: Sequence[str], *, tls: bool = False) -> str:
    """``/etc/containers/registries.conf`` (v2): the registry goes in the mirror's path."""
    lines = [f"# registries.conf: pull through ocicache at {proxy}"]
    if tls:
        lines.append(f"# A private CA goes in /etc/containers/certs.d/{proxy}/ca.crt")
    for name in upstreams:
        if ":" in name:
            # "host:port" is not a valid path component of an image reference.
            lines += ["", f"# {name}: a name with a port cannot be a mirror path; use containerd's ns="]
            continue
        lines += [
            "",
            "[[registry]]",
            f"prefix = {_q(name)}",
            f"location = {_q(name)}",
            "[[registry.mirror]]",
            f"location = {_q(f'{proxy}/{name}')}",
        ]
        if not tls:
            lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def buildkitd_toml(proxy: str, upstreams: Sequence[str], *, tls: bool = False) -> str:
    """``/etc/buildkit/buildkitd.toml``. BuildKit resolves through containerd's resolver, so
    the mirror gets ``?ns=<registry>`` as with containerd; the proxy's own entry says HTTP."""
    own = (
        ['  # ca = ["/etc/buildkit/ocicache-ca.crt"]  # a private CA']
        if tls
        else ["  http = true", "  insecure = true"]
    )
    lines = [f"# buildkitd.toml: pull through ocicache at {proxy}"]
    for name in upstreams:
        lines += ["", f"[registry.{_q(name)}]", f"  mirrors = [{_q(proxy)}]"]
        if name == proxy:
            # One table per name: TOML refuses a second [registry."<proxy>"].
            lines += own
    if proxy not in upstreams:
        lines += ["", f"[registry.{_q(proxy)}]", *own]
    return "\n".join(lines) + "\n"


def k3s_registries_yaml(proxy: str, upstreams: Sequence[str], *, tls: bool = False) -> str:
    """``/etc/rancher/k3s/registries.yaml`` (k3s and RKE2 write containerd hosts.toml from it)."""
    lines = [f"# registries.yaml: pull through ocicache at {proxy}", "mirrors:"]
    for name in upstreams:
        lines += [f"  {_q(name)}:", "    endpoint:", f"      - {_q(f'{_scheme(tls)}://{proxy}')}"]
    if tls:
        lines += [
            "# A private CA:",
            "# configs:",
            f"#   {_q(proxy)}:",
            "#     tls:",
            '#       ca_file: "/etc/rancher/k3s/ocicache-ca.crt"',
        ]
    return "\n".join(lines) + "\n"


class _Generator(Protocol):
    def __call__(self, proxy: str, upstreams: Sequence[str], *, tls: bool = False) -> str: ...


def _simple(generate: _Generator) -> Callable[[str, web.Request], str]:
    def render(proxy: str, request: web.Request) -> str:
        return generate(proxy, _upstream_names(request), tls=_tls(request))

    return render


def _containerd(proxy: str, request: web.Request) -> str:
    registry = request.query.get("registry")
    if not registry:
        raise OciError(
            Code.REQUEST_INVALID,
            "registry= is required: a configured upstream, or _default",
            {"registries": [*_upstream_names(request), DEFAULT_DIR]},
        )
    override = request.query.get("override_path", "").lower() in _TRUE
    return containerd_hosts_toml(
        proxy, registry, _upstream_names(request), override_path=override, tls=_tls(request)
    )


def _tls(request: web.Request) -> bool:
    return request.app[keys.SETTINGS].tls is not None


def _scheme(tls: bool) -> str:
    return "https" if tls else "http"


def _upstream_names(request: web.Request) -> list[str]:
    return [u.name for u in request.app[keys.SETTINGS].upstreams]


# client -> (renderer, content type)
CLIENTS: Final[dict[str, tuple[Callable[[str, web.Request], str], str]]] = {
    "docker": (_simple(docker_daemon_json), "application/json"),
    "containerd": (_containerd, "text/plain"),
    "registries.conf": (_simple(registries_conf), "text/plain"),
    "buildkitd.toml": (_simple(buildkitd_toml), "text/plain"),
    "k3s": (_simple(k3s_registries_yaml), "text/plain"),
}


async def setup(request: web.Request) -> web.Response:
    """``GET /setup/{client}``: a configuration file that points ``client`` at this proxy."""
    entry = CLIENTS.get(request.match_info["client"])
    if entry is None:
        raise OciError(Code.NAME_UNKNOWN, "no such setup", {"clients": sorted(CLIENTS)})
    render, content_type = entry
    # Without a usable Host header: loopback on the port this request arrived on.
    proxy = reached_at(request, request.app[keys.SETTINGS].listen_port)
    return web.Response(text=render(proxy, request), content_type=content_type, charset="utf-8")
