"""Which digests pins protect: an index, its manifests, their configs and layers."""

from __future__ import annotations

from proxy.store.catalogue import ManifestInfo, TagAnswer
from proxy.store.pins import pinned_digests

INDEX, AMD, ARM = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
LAYERS = ["sha256:" + c * 64 for c in "456789"]


def test_a_pinned_tag_protects_its_whole_image() -> None:
    manifests = {
        INDEX: ManifestInfo("index", 10, children=(AMD, ARM)),
        AMD: ManifestInfo("m", 10, children=tuple(LAYERS[:3])),
        ARM: ManifestInfo("m", 10, children=tuple(LAYERS[3:5])),
    }
    tags = {("docker.io", "library/app", "v1"): {"k": TagAnswer(INDEX, "index", 1.0)}}
    got = pinned_digests(["app:v1"], tags, manifests, ["docker.io"])
    assert got == {INDEX, AMD, ARM, *LAYERS[:5]}
    assert LAYERS[5] not in got
    # By digest: that manifest and what it needs, whatever the tags say.
    assert pinned_digests([f"app@{ARM}"], {}, manifests, ["docker.io"]) == {ARM, *LAYERS[3:5]}
    # Not cached yet, or for an upstream no longer configured: nothing.
    assert pinned_digests(["app:v2", "ghcr.io/x/y:1"], tags, manifests, ["docker.io"]) == frozenset()
