"""Image references as users write them."""

from __future__ import annotations

import pytest

from proxy.core.imageref import BadReference, parse_image_reference

UPSTREAMS = ["docker.io", "ghcr.io", "myreg.io:5000", "localhost:5001"]
HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("docker.io/library/alpine:3.20", "docker.io/library/alpine:3.20"),
        ("index.docker.io/library/alpine:3.20", "docker.io/library/alpine:3.20"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        (f"ghcr.io/org/app@sha256:{HEX}", f"ghcr.io/org/app@sha256:{HEX}"),
        (f"ghcr.io/org/app:1.2@sha256:{HEX}", f"ghcr.io/org/app:1.2@sha256:{HEX}"),
        ("myreg.io:5000/team/app:v1", "myreg.io:5000/team/app:v1"),
        ("myreg.io:5000/team/app", "myreg.io:5000/team/app:latest"),
        ("localhost:5001/app", "localhost:5001/app:latest"),
    ],
)
def test_references(text: str, expected: str) -> None:
    assert str(parse_image_reference(text, UPSTREAMS, "docker.io")) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("quay.io/org/app:1", "quay.io"),
        ("", "not an image reference"),
        ("alpine:3.20 extra", "not an image reference"),
        ("Alpine:1", "invalid repository name"),
        ("alpine:-bad", "invalid tag"),
        ("alpine@sha256:abc", "malformed digest"),
        ("a" * 600, "not an image reference"),
    ],
)
def test_bad_references_say_why(text: str, says: str) -> None:
    with pytest.raises(BadReference) as info:
        parse_image_reference(text, UPSTREAMS, "docker.io")
    assert says in str(info.value)
