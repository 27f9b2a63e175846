"""What a client's Accept asks for, and what a body really is."""

from __future__ import annotations

import json

import pytest

from proxy.core.mediatypes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    MANIFEST_TYPES,
    MAX_ACCEPTED,
    OCI_INDEX,
    OCI_MANIFEST,
    NotAManifest,
    accept_key,
    accepted_types,
    manifest_type,
    upstream_accept,
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        (["*/*"], None),
        ([f"{DOCKER_MANIFEST}, */*"], None),
        ([DOCKER_MANIFEST], {DOCKER_MANIFEST}),
        ([f"{DOCKER_MANIFEST};q=0.9", OCI_INDEX], {DOCKER_MANIFEST, OCI_INDEX}),
        ([f"{DOCKER_MANIFEST}, {OCI_INDEX};q=0"], {DOCKER_MANIFEST}),
        ([f"{OCI_INDEX.upper()}"], {OCI_INDEX}),
        (["garbage!!, ;;, a/b/c"], None),
        (["\u00e9/\u00e9"], None),
    ],
)
def test_accepted_types(headers: list[str], expected: set[str] | None) -> None:
    got = accepted_types(headers)
    assert got == (None if expected is None else frozenset(expected))


def test_a_huge_accept_is_bounded_and_keeps_the_known_types() -> None:
    many = [f"application/x-{i}" for i in range(500)]
    got = accepted_types([", ".join([*many, OCI_INDEX])])
    assert got is not None and len(got) == MAX_ACCEPTED and OCI_INDEX in got


def test_anything_is_the_full_set() -> None:
    assert accept_key(None) == accept_key(frozenset(MANIFEST_TYPES))
    assert accept_key(frozenset({DOCKER_MANIFEST})) != accept_key(None)
    assert upstream_accept(None).split(", ") == list(MANIFEST_TYPES)


def _doc(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_doc(schemaVersion=2, mediaType=OCI_MANIFEST, config={}, layers=[]), OCI_MANIFEST),
        (_doc(schemaVersion=2, config={}, layers=[]), OCI_MANIFEST),
        (_doc(schemaVersion=2, manifests=[]), OCI_INDEX),
        (_doc(schemaVersion=2, mediaType=DOCKER_LIST, manifests=[]), DOCKER_LIST),
        # The body's own claim beats its shape.
        (_doc(schemaVersion=2, mediaType=DOCKER_MANIFEST, config={}, layers=[]), DOCKER_MANIFEST),
        (_doc(schemaVersion=1, fsLayers=[], signatures=[]), DOCKER_SCHEMA1_SIGNED),
        (_doc(schemaVersion=1, fsLayers=[]), DOCKER_SCHEMA1),
    ],
)
def test_manifest_type_from_the_body(body: bytes, expected: str) -> None:
    assert manifest_type(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>log in</body></html>",
        b"\x1f\x8b\x08\x00 a gzipped layer",
        b"[1, 2]",
        b"",
        _doc(schemaVersion=3, manifests=[]),
        _doc(schemaVersion=2),
        _doc(schemaVersion=2, mediaType="text/html", manifests=[]),
        _doc(schemaVersion=2, mediaType=5, manifests=[]),
        b"\xff\xfe not utf-8",
    ],
)
def test_what_is_not_a_manifest(body: bytes) -> None:
    with pytest.raises(NotAManifest):
        manifest_type(body)
