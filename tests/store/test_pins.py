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


SUBJECT_SIG, SIG_LAYER, SBOM, SBOM_LAYER, SIG_OF_SBOM = ("sha256:" + c * 64 for c in "abcde")


def test_pins_keep_the_referrers_of_a_pinned_image_but_not_referrers_of_referrers() -> None:
    manifests = {
        INDEX: ManifestInfo("index", 10, children=(AMD,)),
        AMD: ManifestInfo("m", 10, children=tuple(LAYERS[:2])),
        # A signature of the index and an SBOM of the platform manifest, and a signature of
        # that SBOM: a pin keeps what verifies the image, not what verifies its attachments.
        SUBJECT_SIG: ManifestInfo("m", 10, children=(SIG_LAYER,), subject=INDEX),
        SBOM: ManifestInfo("m", 10, children=(SBOM_LAYER,), subject=AMD),
        SIG_OF_SBOM: ManifestInfo("m", 10, children=(LAYERS[5],), subject=SBOM),
    }
    referrers_of = {INDEX: {SUBJECT_SIG}, AMD: {SBOM}, SBOM: {SIG_OF_SBOM}}
    tags = {("docker.io", "library/app", "v1"): {"k": TagAnswer(INDEX, "index", 1.0)}}
    got = pinned_digests(["app:v1"], tags, manifests, ["docker.io"], referrers_of)
    assert got == {INDEX, AMD, *LAYERS[:2], SUBJECT_SIG, SIG_LAYER, SBOM, SBOM_LAYER}
    # Without the index held (evicted, say), nothing reaches its signature any more.
    del manifests[INDEX]
    got = pinned_digests(["app:v1"], tags, manifests, ["docker.io"], referrers_of)
    assert SUBJECT_SIG not in got and SIG_LAYER not in got
    # And an image nobody pinned keeps nothing.
    assert pinned_digests([], tags, manifests, ["docker.io"], referrers_of) == frozenset()
