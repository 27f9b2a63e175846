"""The referrers answer without sockets: descriptors from hostile upstreams, what an index is,
the fallback tag schema, the artifactType filter, and the bound."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.core.errors import Code, OciError
from proxy.core.mediatypes import MANIFEST_MAX, OCI_INDEX, OCI_MANIFEST
from proxy.core.reference import Digest
from proxy.core.referrers import (
    ANNOTATIONS_MAX,
    Descriptor,
    NotAnIndex,
    artifact_type_filter,
    decode,
    encode,
    fallback_tag,
    filters_applied,
    index_body,
    is_fallback_tag,
    merged,
    of_manifest,
    only,
    parse_descriptor,
    parse_index,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def entry(**fields: Any) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": D1, "size": 100, **fields}


def test_a_valid_descriptor_keeps_only_the_fields_of_a_referrer() -> None:
    got = parse_descriptor(
        entry(artifactType=SIG, annotations={"a": "b"}, data="eyJ9", urls=["http://x"], platform={})
    )
    assert got == Descriptor(OCI_MANIFEST, D1, 100, SIG, (("a", "b"),))
    assert got.to_json() == {
        "mediaType": OCI_MANIFEST,
        "digest": D1,
        "size": 100,
        "artifactType": SIG,
        "annotations": {"a": "b"},
    }


HOSTILE = [
    "not a mapping",
    entry(mediaType="text/html"),
    entry(mediaType=None),
    entry(digest="sha256:abc"),
    entry(digest="sha256:" + "A" * 64),
    entry(digest="md5:" + "a" * 32),
    entry(digest=["sha256:" + "1" * 64]),
    entry(size=True),
    entry(size=-1),
    entry(size=0),
    entry(size=1.5),
    entry(size=MANIFEST_MAX + 1),
    entry(size="100"),
    # artifactType strings a hostile upstream might send.
    entry(artifactType="a" * 300 + "/b"),
    entry(artifactType="application/x\r\nSet-Cookie: a=b"),
    entry(artifactType="application/x json"),
    entry(artifactType="<script>alert(1)</script>"),
    entry(artifactType="application/\u00e9"),
    entry(artifactType=""),
    entry(artifactType=7),
    entry(artifactType={"a": "b"}),
    entry(annotations=["a"]),
    entry(annotations={"a": 1}),
    entry(annotations={"": "x"}),
    entry(annotations={"k": "v" * (ANNOTATIONS_MAX + 1)}),
    entry(annotations={f"k{i}": "v" for i in range(1000)}),
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_a_malformed_or_hostile_descriptor_is_dropped_whole(bad: object) -> None:
    assert parse_descriptor(bad) is None


@pytest.mark.parametrize(
    "body",
    [
        b"<html>login</html>",
        b"",
        b"[]",
        b'{"schemaVersion": 2}',
        b'{"schemaVersion": 1, "manifests": []}',
        json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}).encode(),
        json.dumps({"schemaVersion": 2, "manifests": {}}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
    ],
)
def test_what_is_not_an_image_index_is_refused(body: bytes) -> None:
    with pytest.raises(NotAnIndex):
        parse_index(body)


def test_an_index_gives_its_valid_entries_and_counts_the_rest() -> None:
    body = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [entry(), entry(digest="x"), 5, entry(digest=D2, artifactType=SBOM)],
        }
    ).encode()
    found, dropped = parse_index(body)
    assert [d.digest for d in found] == [D1, D2]
    assert dropped == 2


def test_the_answer_is_always_an_index_even_empty() -> None:
    assert json.loads(index_body([])) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    one = Descriptor(OCI_MANIFEST, D1, 5, SIG)
    assert json.loads(index_body([one]))["manifests"] == [one.to_json()]


def test_stored_descriptors_round_trip_and_are_checked_again() -> None:
    ds = (Descriptor(OCI_MANIFEST, D1, 5, SIG, (("k", "v"),)), Descriptor(OCI_MANIFEST, D2, 6))
    assert decode(encode(ds)) == ds
    assert decode("not json") == ()
    assert decode('{"a": 1}') == ()
    assert decode(json.dumps([entry(digest="bad"), entry()])) == (Descriptor(OCI_MANIFEST, D1, 100),)


def test_a_held_manifest_is_described_with_its_artifact_type_and_annotations() -> None:
    body = json.dumps(
        {"schemaVersion": 2, "annotations": {"org.opencontainers.image.created": "now"}}
    ).encode()
    got = of_manifest(body, D1, OCI_MANIFEST, SBOM)
    assert got == Descriptor(
        OCI_MANIFEST, D1, len(body), SBOM, (("org.opencontainers.image.created", "now"),)
    )
    # An index without artifactType has none; hostile annotations drop it.
    bare = b'{"schemaVersion": 2}'
    assert of_manifest(bare, D1, OCI_INDEX, None) == Descriptor(OCI_INDEX, D1, len(bare))
    assert of_manifest(json.dumps({"annotations": {"a": 5}}).encode(), D1, OCI_MANIFEST, None) is None
    assert of_manifest(b"garbage", D1, OCI_MANIFEST, None) is None
    assert of_manifest(b"{}", D1, OCI_MANIFEST, "bad type") is None


def test_merged_keeps_each_digest_once_in_order_up_to_the_bound() -> None:
    a, b, c = (Descriptor(OCI_MANIFEST, d, 1) for d in (D1, D2, D3))
    assert merged([[a, b], [b, c]], 10) == ([a, b, c], False)
    assert merged([[a, b], [b, c]], 2) == ([a, b], True)
    assert merged([[a, b]], 2) == ([a, b], False)


def test_only_filters_by_exact_artifact_type() -> None:
    sig, sbom, none = (
        Descriptor(OCI_MANIFEST, D1, 1, SIG),
        Descriptor(OCI_MANIFEST, D2, 1, SBOM),
        Descriptor(OCI_INDEX, D3, 1),
    )
    assert only([sig, sbom, none], None) == [sig, sbom, none]
    assert only([sig, sbom, none], SBOM) == [sbom]
    assert only([sig, sbom, none], SBOM.upper()) == []


def test_the_fallback_tag_schema() -> None:
    assert fallback_tag(Digest("sha256", "a" * 64)) == "sha256-" + "a" * 64
    # sha512's hex is cut to 64 characters, so the tag fits the 128 a tag may have.
    assert fallback_tag(Digest("sha512", "b" * 128)) == "sha512-" + "b" * 64
    assert is_fallback_tag("sha256-" + "a" * 64)
    assert is_fallback_tag("sha512-" + "b" * 64)
    for tag in ("sha256-" + "a" * 63, "sha256-" + "a" * 64 + ".sig", "latest", "sha256-" + "A" * 64):
        assert not is_fallback_tag(tag)


def test_the_artifact_type_query() -> None:
    assert artifact_type_filter([]) is None
    assert artifact_type_filter([SBOM]) == SBOM
    # An unescaped "+" that arrived as a space.
    assert artifact_type_filter(["application/spdx json"]) == SBOM
    for bad in (["x"], ["a/b", "c/d"], ["application/x\r\n"], ["a" * 300 + "/b"], [""]):
        with pytest.raises(OciError) as info:
            artifact_type_filter(bad)
        assert info.value.code is Code.REQUEST_INVALID


def test_filters_applied_header() -> None:
    assert filters_applied("artifactType")
    assert filters_applied("annotation, artifactType")
    assert not filters_applied("")
    assert not filters_applied("artifactTypes")
