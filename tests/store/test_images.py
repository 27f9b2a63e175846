"""The cache as images: rows, sizes, and what removing images frees."""

from __future__ import annotations

from proxy.store.catalogue import BLOB, MANIFEST, BlobEntry, ManifestInfo, TagAnswer
from proxy.store.images import files_only_they_need, rows_of

D = {
    name: "sha256:" + c * 64
    for name, c in zip(["index", "amd", "arm", "l1", "l2", "l3", "other", "ol"], "12345678", strict=True)
}


def entry(size: int, kind: int = BLOB, used: float = 1.0) -> BlobEntry:
    return BlobEntry(size, kind, 0.0, used)


MANIFESTS = {
    D["index"]: ManifestInfo(
        "application/vnd.oci.image.index.v1+json", 10, ("linux/amd64", "linux/arm64"), (D["amd"], D["arm"])
    ),
    D["amd"]: ManifestInfo("application/vnd.oci.image.manifest.v1+json", 20, (), (D["l1"], D["l2"])),
    D["arm"]: ManifestInfo("application/vnd.oci.image.manifest.v1+json", 30, (), (D["l1"], D["l3"])),
    D["other"]: ManifestInfo("application/vnd.oci.image.manifest.v1+json", 40, (), (D["l1"], D["ol"])),
}
BLOBS = {
    D["index"]: entry(10, MANIFEST, used=5.0),
    D["amd"]: entry(20, MANIFEST),
    D["arm"]: entry(30, MANIFEST),
    D["l1"]: entry(100),
    D["l2"]: entry(200),
    # l3 is not held (the arm64 layer was never pulled)
    D["other"]: entry(40, MANIFEST),
    D["ol"]: entry(400),
}
TAGS = {
    ("docker.io", "library/multi", "v1"): {
        "all": TagAnswer(D["index"], "application/vnd.oci.image.index.v1+json", 1.0),
        "v2only": TagAnswer(D["amd"], "application/vnd.oci.image.manifest.v1+json", 2.0),
    },
}


def test_rows_show_the_index_for_a_tag_and_untagged_manifests_by_digest() -> None:
    rows = rows_of(TAGS, MANIFESTS, BLOBS, frozenset({D["other"]}))
    assert [r.reference for r in rows] == ["docker.io/library/multi:v1", D["other"]]
    multi, other = rows
    assert (multi.digest, multi.platforms, multi.last_used, multi.pinned) == (
        D["index"],
        ("linux/amd64", "linux/arm64"),
        5.0,
        False,
    )
    assert multi.size == 10 + 20 + 30 + 100 + 200  # what is held of its closure
    assert (other.size, other.pinned) == (40 + 100 + 400, True)


def test_removing_an_image_frees_only_what_no_other_image_or_pin_needs() -> None:
    rows = rows_of(TAGS, MANIFESTS, BLOBS, frozenset())
    multi, other = rows
    freed = files_only_they_need([multi], [other], MANIFESTS, frozenset())
    assert freed == {D["index"], D["amd"], D["arm"], D["l2"], D["l3"]}  # l1 is other's too
    assert D["l2"] not in files_only_they_need([multi], [other], MANIFESTS, frozenset({D["l2"]}))
