"""``GET /``: the status page for people, rendered on the server from ``templates/status.html``
(Jinja2 through aiohttp-jinja2, autoescaped).

It needs nothing from elsewhere (no script, no stylesheet or font to fetch: it works in an
air-gapped site), refreshes itself, changes nothing (GET only, no forms), and shows no secret:
no credential, token or URL path of an upstream. Its answer forbids scripts outright
(Content-Security-Policy), so a name that slipped past the escaping still could not run.

Under client auth it is public, and shows what an anonymous client may pull: images, fills
and pins of a repository the rules refuse to anonymous clients are left out, and the
upstreams' hosts are not named. The whole view is the admin API's (``/admin/v1/stats``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proxy.core.errors import OciError
from proxy.web import keys, setup
from proxy.web.address import reached_at
from proxy.web.overview import Visible, everything, overview

REFRESH_SECONDS: Final = 10
# No script, nothing fetched from anywhere; inline styles and the inline SVG only.
CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def ago(when: float | None, now: float | None = None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now if now is not None else time.time()) - when)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "bytes": human_bytes,
    "percent": percent,
    "ago": ago,
    "duration": duration,
}


def templates(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("proxy.web", "templates"),
        autoescape=True,
        default_helpers=False,
        filters=FILTERS,
        undefined=jinja2.StrictUndefined,
    )


def visible_to_anonymous(request: web.Request) -> tuple[Visible, bool]:
    """What the page may show, and whether it is the whole picture."""
    settings = request.app[keys.SETTINGS]
    if not settings.auth.enabled:
        return everything, True
    guard = request.app[keys.GUARD]
    if guard.logins and not settings.auth.anonymous:
        return (lambda upstream, repository: False), False
    rules = guard.rules
    return (lambda upstream, repository: rules.allows(None, upstream, repository)), False


def client_setups(request: web.Request) -> list[tuple[str, str, str]]:
    """(title, where it goes, the file) for each client, as /setup/* serves them."""
    settings = request.app[keys.SETTINGS]
    proxy = reached_at(request, settings.listen_port)
    names = [u.name for u in settings.upstreams]
    tls = settings.tls is not None
    found: list[tuple[str, str, str]] = []
    candidates: list[tuple[str, str, Callable[[], str]]] = [
        ("Docker", "/etc/docker/daemon.json", lambda: setup.docker_daemon_json(proxy, names, tls=tls)),
        (
            "containerd (every registry)",
            "/etc/containerd/certs.d/_default/hosts.toml",
            lambda: setup.containerd_hosts_toml(
                proxy, setup.DEFAULT_DIR, names, override_path=False, tls=tls
            ),
        ),
        (
            "CRI-O, podman, skopeo, buildah",
            "/etc/containers/registries.conf",
            lambda: setup.registries_conf(proxy, names, tls=tls),
        ),
        ("BuildKit", "/etc/buildkit/buildkitd.toml", lambda: setup.buildkitd_toml(proxy, names, tls=tls)),
        (
            "k3s, RKE2",
            "/etc/rancher/k3s/registries.yaml",
            lambda: setup.k3s_registries_yaml(proxy, names, tls=tls),
        ),
    ]
    for title, path, render in candidates:
        try:
            found.append((title, path, render()))
        except OciError:
            continue  # Docker without docker.io as the default upstream: nothing to hand out
    return found


async def status_page(request: web.Request) -> web.Response:
    visible, whole = visible_to_anonymous(request)
    view = overview(request.app, visible)
    settings = request.app[keys.SETTINGS]
    context = {
        "o": view,
        "whole": whole,
        "show_hosts": whole,
        "refresh": REFRESH_SECONDS,
        "setups": client_setups(request),
        "proxy": reached_at(request, settings.listen_port),
        "scheme": "https" if settings.tls is not None else "http",
        "chart_width": 600,
        "chart_height": 120,
    }
    resp = aiohttp_jinja2.render_template("status.html", request, context)
    resp.headers.update(HEADERS)
    return resp
