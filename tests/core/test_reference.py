"""The request grammar: names, tags, digests, paths and ranges, without sockets."""

from __future__ import annotations

import pytest

from proxy.core.errors import Code, OciError
from proxy.core.ranges import ByteRange, parse_range
from proxy.core.reference import Digest, Kind, parse_path, validate_name

HEX = "a" * 64


@pytest.mark.parametrize(
    ("path", "kind", "name", "ref"),
    [
        ("/v2/library/alpine/manifests/latest", Kind.MANIFEST, "library/alpine", "latest"),
        ("/v2/a/b/c/manifests/v1.2_3-x", Kind.MANIFEST, "a/b/c", "v1.2_3-x"),
        (f"/v2/alpine/manifests/sha256:{HEX}", Kind.MANIFEST, "alpine", Digest("sha256", HEX)),
        (f"/v2/alpine/blobs/sha256:{HEX}", Kind.BLOB, "alpine", Digest("sha256", HEX)),
        (f"/v2/x/blobs/sha512:{'b' * 128}", Kind.BLOB, "x", Digest("sha512", "b" * 128)),
        ("/v2/library/alpine/tags/list", Kind.TAGS, "library/alpine", None),
        # A registry prefix is kept for routing to interpret.
        ("/v2/ghcr.io/org/app/manifests/1", Kind.MANIFEST, "ghcr.io/org/app", "1"),
        ("/v2/myreg.io:5000/app/manifests/1", Kind.MANIFEST, "myreg.io:5000/app", "1"),
        # A repository named like an endpoint word still parses by the last marker.
        ("/v2/blobs/manifests/manifests/x", Kind.MANIFEST, "blobs/manifests", "x"),
        (f"/v2/alpine/referrers/sha256:{HEX}", Kind.REFERRERS, "alpine", Digest("sha256", HEX)),
        (
            f"/v2/ghcr.io/o/a/referrers/sha512:{'b' * 128}",
            Kind.REFERRERS,
            "ghcr.io/o/a",
            Digest("sha512", "b" * 128),
        ),
        (f"/v2/referrers/referrers/sha256:{HEX}", Kind.REFERRERS, "referrers", Digest("sha256", HEX)),
        (f"/v2/a/manifests/b/referrers/sha256:{HEX}", Kind.REFERRERS, "a/manifests/b", Digest("sha256", HEX)),
        (f"/v2/a/referrers/b/manifests/sha256:{HEX}", Kind.MANIFEST, "a/referrers/b", Digest("sha256", HEX)),
        ("/v2/a/referrers/b/manifests/v1", Kind.MANIFEST, "a/referrers/b", "v1"),
    ],
)
def test_valid_paths(path: str, kind: Kind, name: str, ref: object) -> None:
    parsed = parse_path(path)
    assert (parsed.kind, parsed.name, parsed.reference) == (kind, name, ref)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/../../etc/passwd", Code.NAME_INVALID),
        ("/v2/../../etc/passwd/manifests/latest", Code.NAME_INVALID),
        ("/v2/%2e%2e/%2e%2e/etc/passwd/manifests/latest", Code.NAME_INVALID),
        ("/v2/library%2Falpine/manifests/latest", Code.NAME_INVALID),
        ("/v2/a/./b/manifests/latest", Code.NAME_INVALID),
        ("/v2/alpine/blobs/sha256:../../x", Code.DIGEST_INVALID),
        ("/v2/alpine/blobs/sha256:abc", Code.DIGEST_INVALID),
        (f"/v2/alpine/blobs/sha256:{'g' * 64}", Code.DIGEST_INVALID),
        (f"/v2/alpine/blobs/sha256:{'A' * 64}", Code.DIGEST_INVALID),
        (f"/v2/alpine/blobs/md5:{'a' * 32}", Code.DIGEST_INVALID),
        (f"/v2/alpine/manifests/md5:{'a' * 32}", Code.DIGEST_INVALID),
        ("/v2/alpine/blobs/latest", Code.DIGEST_INVALID),
        ("/v2/Library/alpine/manifests/latest", Code.NAME_INVALID),
        ("/v2/library//alpine/manifests/latest", Code.NAME_INVALID),
        ("/v2/library/alpine//manifests/latest", Code.NAME_INVALID),
        ("/v2/alpine/manifests/-latest", Code.TAG_INVALID),
        ("/v2/alpine/manifests/" + "t" * 200, Code.TAG_INVALID),
        ("/v2/alpine/manifests/", Code.TAG_INVALID),
        ("/v2/alpine", Code.NAME_UNKNOWN),
        # A referrers subject is a digest, never a tag.
        ("/v2/alpine/referrers/latest", Code.DIGEST_INVALID),
        ("/v2/alpine/referrers/sha256:abc", Code.DIGEST_INVALID),
        (f"/v2/alpine/referrers/sha256:{'A' * 64}", Code.DIGEST_INVALID),
        (f"/v2/alpine/referrers/sha256:{HEX}/x", Code.DIGEST_INVALID),
        ("/v2/alpine/referrers/", Code.DIGEST_INVALID),
        (f"/v2/../referrers/sha256:{HEX}", Code.NAME_INVALID),
        ("/etc/passwd", Code.NAME_UNKNOWN),
    ],
)
def test_bad_paths_are_refused_with_their_code(path: str, code: Code) -> None:
    with pytest.raises(OciError) as info:
        parse_path(path)
    assert info.value.code is code
    assert 400 <= info.value.status < 500


@pytest.mark.parametrize(
    "name",
    [
        "a" * 300,
        "library/",
        "/library",
        "UPPER",
        "a//b",
        "a/../b",
        "a..b",
        "-a",
        "a-",
        "a_-b",
        "ghcr.io:5000/x",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(OciError) as info:
        validate_name(name)
    assert info.value.code is Code.NAME_INVALID


@pytest.mark.parametrize("name", ["a", "library/alpine", "a.b/c_d/e__f/g--h", "x" * 255])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


def test_digest_round_trips() -> None:
    d = Digest.parse(f"sha256:{HEX}")
    assert str(d) == f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, ByteRange(0, 99)),
        ("bytes=10-19", 100, ByteRange(10, 19)),
        ("bytes=90-500", 100, ByteRange(90, 99)),
        ("bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=-500", 100, ByteRange(0, 99)),
        ("bytes=0-0", 1, ByteRange(0, 0)),
        # Several ranges: RFC 9110 lets us answer with the whole body.
        ("bytes=0-1,5-6", 100, None),
        ("items=0-5", 100, None),
    ],
)
def test_ranges(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", ["bytes=500-0", "bytes=5000-10000", "bytes=100-", "bytes=-0", "bytes=x-y", "bytes=5"]
)
def test_unsatisfiable_ranges_are_416_with_content_range(header: str) -> None:
    with pytest.raises(OciError) as info:
        parse_range(header, 100)
    assert info.value.status == 416
    assert info.value.headers["Content-Range"] == "bytes */100"


def test_content_range_header() -> None:
    assert ByteRange(10, 19).content_range(100) == "bytes 10-19/100"
