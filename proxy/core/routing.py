"""Pure: which configured upstream, and which repository on it, a request means.

In order: containerd's ``?ns=<registry>``; a path prefix ``/v2/<registry>/<repository>/...``
whose first component is a configured registry (CRI-O, podman and skopeo mirrors, containerd
with ``override_path``); otherwise the default upstream (a Docker daemon's ``registry-mirrors``
sends only Docker Hub names). ``ns`` and prefixes are keys into the configuration, never hosts
to dial: a registry that is not configured is refused here, before any connection.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from proxy.core.errors import Code, OciError
from proxy.core.reference import validate_name

DOCKER_HUB: Final = "docker.io"


@dataclass(frozen=True, slots=True)
class Route:
    upstream: str
    repository: str


def route(name: str, ns: str | None, configured: Collection[str], default: str) -> Route:
    first, _, rest = name.partition("/")
    if ns is not None:
        if ns not in configured:
            raise OciError(Code.NAME_UNKNOWN, "registry not configured on this proxy", {"ns": ns[:100]})
        upstream = ns
        # containerd with override_path sends both the prefix and ns=: the prefix is not part
        # of the repository.
        repository = rest if first == ns and rest else name
    elif rest and first in configured:
        upstream, repository = first, rest
    else:
        if ":" in first:
            # "host:port/..." that is not configured: a registry, not a repository name.
            raise OciError(
                Code.NAME_UNKNOWN, "registry not configured on this proxy", {"registry": first[:100]}
            )
        upstream, repository = default, name
    validate_name(repository)
    if upstream == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    return Route(upstream, repository)
