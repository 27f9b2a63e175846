"""Pure: image references as registry users write them, resolved to a configured upstream.

``docker.io/library/alpine:3.20``, ``alpine`` (the default upstream; Docker Hub adds
``library/``), ``ghcr.io/org/app@sha256:...``, ``ghcr.io/org/app:1.2@sha256:...``. The first
component names a registry when it looks like a host (a dot, a port, or ``localhost``), as
Docker decides it; a registry that is not configured is an error that names it. Used by pins,
prefetch, export, import and the admin API.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from proxy.core.errors import OciError
from proxy.core.reference import Digest, validate_name, validate_tag
from proxy.core.routing import DOCKER_HUB

# Names Docker Hub goes by in references people copy from docs and scripts.
_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
REFERENCE_MAX: Final = 512


class BadReference(ValueError):
    """A reference that cannot be used, with a message that says why."""


@dataclass(frozen=True, slots=True)
class ImageRef:
    upstream: str
    repository: str
    tag: str | None
    digest: Digest | None

    def __str__(self) -> str:
        text = f"{self.upstream}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        return f"{self.upstream}/{self.repository}"


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_image_reference(text: str, configured: Collection[str], default: str) -> ImageRef:
    """``text`` as an :class:`ImageRef` on one of the ``configured`` upstreams.

    A reference with neither tag nor digest means ``:latest``, as every client reads it.
    """
    text = text.strip()
    if not text or len(text) > REFERENCE_MAX or any(c.isspace() for c in text):
        raise BadReference(f"not an image reference: {text[:100]!r}")
    rest, at, digest_text = text.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except OciError as exc:
            raise BadReference(f"{text}: {exc.message}") from None
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        registry, path = first, remainder
    else:
        registry, path = default, rest
    name, tag = path, None
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        name, tag = path[:colon], path[colon + 1 :]
    upstream = registry.lower()
    if upstream in _HUB_ALIASES and DOCKER_HUB in configured:
        upstream = DOCKER_HUB
    if upstream not in configured:
        raise BadReference(f"{text}: registry {registry!r} is not configured on this proxy")
    try:
        validate_name(name)
        if tag is not None:
            validate_tag(tag)
    except OciError as exc:
        raise BadReference(f"{text}: {exc.message}") from None
    if upstream == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(upstream, name, tag, digest)
