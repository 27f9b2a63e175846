"""Pure routing: ns=, path prefix, default; never a host a client names."""

from __future__ import annotations

import pytest

from proxy.core.errors import Code, OciError
from proxy.core.routing import Route, route

CONFIGURED = ("docker.io", "ghcr.io", "myreg.io:5000")


@pytest.mark.parametrize(
    ("name", "ns", "expected"),
    [
        ("alpine", None, Route("docker.io", "library/alpine")),
        ("library/alpine", None, Route("docker.io", "library/alpine")),
        ("bitnami/redis", None, Route("docker.io", "bitnami/redis")),
        ("org/app", "ghcr.io", Route("ghcr.io", "org/app")),
        ("alpine", "docker.io", Route("docker.io", "library/alpine")),
        ("app", "myreg.io:5000", Route("myreg.io:5000", "app")),
        ("ghcr.io/org/app", None, Route("ghcr.io", "org/app")),
        ("docker.io/alpine", None, Route("docker.io", "library/alpine")),
        ("myreg.io:5000/team/app", None, Route("myreg.io:5000", "team/app")),
        # containerd with override_path: prefix and ns= both present.
        ("ghcr.io/org/app", "ghcr.io", Route("ghcr.io", "org/app")),
        # A first component that is not configured is part of a Docker Hub repository name.
        ("quay.io/org/app", None, Route("docker.io", "quay.io/org/app")),
    ],
)
def test_routes(name: str, ns: str | None, expected: Route) -> None:
    assert route(name, ns, CONFIGURED, "docker.io") == expected


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("x", "evil.test"),
        ("x", "127.0.0.1:9999"),
        ("x", "169.254.169.254"),
        ("127.0.0.1:9999/x", None),
        ("evil.test:443/x", None),
    ],
)
def test_unconfigured_registries_are_refused(name: str, ns: str | None) -> None:
    with pytest.raises(OciError) as info:
        route(name, ns, CONFIGURED, "docker.io")
    assert info.value.code is Code.NAME_UNKNOWN
