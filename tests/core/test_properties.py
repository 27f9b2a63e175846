"""Hostile input, generated: properties of the pure parsers a client (or an upstream) feeds.

For every input, each parser either returns a value that keeps its promises (names only of the
name grammar, ranges inside the blob, headers that cannot break out of their quotes) or raises
its one documented error type: never anything else, which the app would turn into a 500. The
strategies mix the grammar's own pieces with the characters and sizes that have broken parsers
before (percent-encoding, dot segments, CR/LF, non-ASCII digits, digit bombs, deep nesting).
Example counts are bounded (see ``tests/conftest.py``) so the suite stays quick.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core import authorization, mediatypes
from proxy.core.authorization import BadCredentials, Basic, Bearer
from proxy.core.errors import Code, OciError
from proxy.core.hostheader import proxy_address
from proxy.core.imageref import BadReference, parse_image_reference
from proxy.core.links import PAGING, next_link
from proxy.core.mediatypes import NotAManifest
from proxy.core.ranges import MAX_RANGES, ByteRange, parse_ranges
from proxy.core.reference import (
    NAME_MAX,
    NAME_RE,
    TAG_RE,
    Digest,
    Kind,
    PathRequest,
    parse_path,
    validate_name,
    validate_tag,
)
from proxy.core.routing import route

# --- building blocks ----------------------------------------------------------------------------

# Characters and fragments that have broken request parsers: separators, encodings, controls,
# other scripts' digits and letters, and the grammar's own keywords.
_NASTY = [
    "/", "//", ".", "..", "%", "%2e", "%2F", "%00", "\\", ":", "@", "#", "?", "&", "=", ";", ",",
    " ", "\t", "\r", "\n", "\r\n", "\x00", "\x7f", '"', "'", "<", ">", "*", "~", "+", "-", "_",
    "²", "٣", "é", "İ", "\u2028", "\ufeff", "manifests", "blobs", "tags", "list", "sha256",
    "sha512", "v2", "library", "docker.io", "ghcr.io", "localhost:5000", "latest",
]  # fmt: skip
_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_HEX = "0123456789abcdef"

nasty_text = st.lists(
    st.one_of(st.sampled_from(_NASTY), st.text(max_size=8), st.text(_LOWER, min_size=1, max_size=6)),
    max_size=16,
).map("".join)

component = st.builds(
    lambda parts, seps: "".join(p + s for p, s in zip(parts, [*seps, ""], strict=False)),
    st.lists(st.text(_LOWER, min_size=1, max_size=8), min_size=1, max_size=3),
    st.lists(st.sampled_from([".", "_", "__", "-", "--"]), max_size=2),
)
valid_name = st.lists(component, min_size=1, max_size=4).map("/".join).filter(lambda n: len(n) <= NAME_MAX)
valid_tag = st.from_regex(TAG_RE, fullmatch=True)
valid_digest = st.one_of(
    st.text(_HEX, min_size=64, max_size=64).map(lambda h: f"sha256:{h}"),
    st.text(_HEX, min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
)
UPSTREAMS = ("docker.io", "ghcr.io", "localhost:5000", "registry.internal")


# --- paths, names, tags, digests ---------------------------------------------------------------


@given(st.one_of(nasty_text, nasty_text.map(lambda t: "/v2/" + t)))
@example("/v2/%2e%2e/%2e%2e/blobs/sha256:" + "a" * 64)
@example("/v2/a/../../etc/passwd")
@example("/v2/" + "a/" * 400 + "tags/list")
@example("/v2/a/manifests/")
@example("/v2/a/blobs/sha256:" + "A" * 64)
def test_any_path_is_a_request_or_a_4xx(raw: str) -> None:
    try:
        parsed = parse_path(raw)
    except OciError as err:
        assert 400 <= err.status < 500
        return
    # What survives parsing names nothing a file system or URL would read specially.
    for comp in parsed.name.split("/"):
        assert comp not in ("", ".", "..")
        assert re.fullmatch(r"[a-z0-9._:-]+", comp)
    if parsed.kind is Kind.BLOB:
        assert isinstance(parsed.reference, Digest)
    elif parsed.kind is Kind.MANIFEST:
        assert isinstance(parsed.reference, Digest) or TAG_RE.fullmatch(str(parsed.reference))
    else:
        assert parsed.reference is None
    try:
        where = route(parsed.name, None, UPSTREAMS, UPSTREAMS[0])
    except OciError as err:
        assert 400 <= err.status < 500
        return
    assert where.upstream in UPSTREAMS
    assert NAME_RE.fullmatch(where.repository)


@given(valid_name, st.one_of(valid_tag, valid_digest), st.sampled_from(["manifests", "blobs"]))
def test_valid_paths_parse_to_their_parts(name: str, ref: str, kind: str) -> None:
    path = f"/v2/{name}/{kind}/{ref}"
    if kind == "blobs" and ":" not in ref:
        try:
            parse_path(path)
        except OciError as err:
            assert err.code is Code.DIGEST_INVALID
        return
    reference: Digest | str = Digest.parse(ref) if ":" in ref else ref
    assert parse_path(path) == PathRequest(Kind(kind), name, reference)
    assert parse_path(f"/v2/{name}/tags/list") == PathRequest(Kind.TAGS, name, None)


@given(st.one_of(nasty_text, st.text()), st.one_of(st.none(), st.sampled_from(UPSTREAMS), nasty_text))
def test_routing_refuses_with_4xx_or_names_a_configured_upstream(name: str, ns: str | None) -> None:
    try:
        where = route(name, ns, UPSTREAMS, UPSTREAMS[0])
    except OciError as err:
        assert 400 <= err.status < 500
        return
    assert where.upstream in UPSTREAMS
    assert NAME_RE.fullmatch(where.repository) and len(where.repository) <= NAME_MAX + len("library/")


@given(st.one_of(nasty_text, valid_digest, valid_digest.map(str.upper), st.text()))
def test_digests_parse_exactly_or_are_digest_invalid(text: str) -> None:
    try:
        digest = Digest.parse(text)
    except OciError as err:
        assert err.code is Code.DIGEST_INVALID
        return
    assert str(digest) == text
    assert re.fullmatch(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", text)


@given(st.one_of(nasty_text, valid_name, valid_tag, st.text()))
def test_names_and_tags_are_grammar_or_4xx(text: str) -> None:
    for validate, grammar in ((validate_name, NAME_RE), (validate_tag, TAG_RE)):
        try:
            assert validate(text) == text
        except OciError as err:
            assert err.status == 400
            continue
        assert grammar.fullmatch(text)


# --- Range ----------------------------------------------------------------------------------------

_number = st.one_of(
    st.integers(0, 300).map(str),
    st.just("9" * 5000),  # past int()'s 4,300-digit guard
    st.just("0" * 50 + "7"),
    st.sampled_from(["", " ", "-1", "+1", "1.5", "٣", "²", "0x10", "1e3"]),
)
_spec = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", _number, _number),
    st.builds(lambda a: f"-{a}", _number),
    st.builds(lambda a: f"{a}-", _number),
    nasty_text,
)
range_header = st.one_of(
    st.builds(
        lambda unit, specs, pad: f"{unit}={pad}" + f"{pad},{pad}".join(specs),
        st.sampled_from(["bytes", "BYTES", " bytes ", "items", ""]),
        st.lists(_spec, min_size=0, max_size=MAX_RANGES + 3),
        st.sampled_from(["", " ", "\t"]),
    ),
    nasty_text,
)


@given(range_header, st.integers(0, 1000))
@example("bytes=0-0," * 63 + "0-0", 10)
@example("bytes=-" + "9" * 5000, 10)
@example("bytes=5-" + "9" * 5000, 10)
def test_ranges_are_inside_the_blob_disjoint_and_ordered_or_416(header: str, size: int) -> None:
    try:
        ranges = parse_ranges(header, size)
    except OciError as err:
        assert err.code is Code.RANGE_INVALID and err.status == 416
        assert err.headers == {"Content-Range": f"bytes */{size}"}
        return
    if ranges is None:
        return
    assert 1 <= len(ranges) <= MAX_RANGES
    for rng in ranges:
        assert 0 <= rng.first <= rng.last < size
    for before, after in itertools.pairwise(ranges):
        assert before.end < after.first  # overlapping or touching ranges were merged


@given(
    st.lists(st.tuples(st.integers(0, 120), st.integers(0, 120)), min_size=1, max_size=8), st.integers(1, 100)
)
def test_ranges_cover_exactly_the_satisfiable_bytes_asked_for(
    pairs: list[tuple[int, int]], size: int
) -> None:
    specs = [(min(a, b), max(a, b)) for a, b in pairs]
    header = "bytes=" + ",".join(f"{a}-{b}" for a, b in specs)
    wanted = {i for a, b in specs for i in range(a, min(b, size - 1) + 1)}
    try:
        ranges = parse_ranges(header, size)
    except OciError:
        assert not wanted  # every range began past the end
        return
    assert ranges is not None
    assert {i for r in ranges for i in range(r.first, r.end)} == wanted
    assert ranges == sorted(ranges, key=lambda r: r.first)
    assert all(isinstance(r, ByteRange) for r in ranges)


# --- Accept, and manifests as bytes ------------------------------------------------------------

_media = st.one_of(
    st.sampled_from([*sorted(mediatypes.KNOWN_TYPES), "*/*", "application/*", "text/html", "*/json"]),
    st.builds(
        lambda a, b: f"{a}/{b}",
        st.text(_LOWER + ".+-", min_size=1, max_size=12),
        st.text(_LOWER + ".+-*", min_size=1, max_size=12),
    ),
    nasty_text.map(lambda t: t[:30]),
)
_param = st.one_of(
    st.sampled_from(
        ["q=0", "q=0.0", "q=0.5", "q=1", "q=nan", "q=inf", "q=-0", "q=", "q", "Q=0", "charset=utf-8"]
    ),
    st.builds(lambda s: f"q={s}", st.sampled_from(["1e999", "9" * 5000, "0." + "0" * 400])),
    st.text(max_size=8),
)
accept_header = st.one_of(
    st.lists(
        st.builds(lambda m, ps: ";".join([m, *ps]), _media, st.lists(_param, max_size=3)), max_size=12
    ).map(", ".join),
    nasty_text,
)


@given(st.lists(accept_header, max_size=4))
def test_any_accept_is_a_bounded_set_of_media_types(headers: list[str]) -> None:
    accepted = mediatypes.accepted_types(headers)
    if accepted is not None:
        assert 1 <= len(accepted) <= mediatypes.MAX_ACCEPTED
        assert all(re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+", t) for t in accepted)
    key = mediatypes.accept_key(accepted)
    upstream = mediatypes.upstream_accept(accepted)
    assert "\r" not in upstream and "\n" not in upstream
    assert mediatypes.accept_key(mediatypes.accepted_types(headers)) == key  # stable


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
            ["schemaVersion", "mediaType", "manifests", "config", "layers", "digest", "platform",
             "os", "architecture", "subject", "fsLayers", "blobSum", "signatures", "artifactType"]
        ), inner, max_size=5)
    ),
    max_leaves=20,
)  # fmt: skip
manifest_body = st.one_of(
    _json.map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
    st.integers(1, 200_000).map(lambda n: b"[" * n),  # deeper than the parser recurses
    st.integers(1, 200_000).map(lambda n: b'{"a":' * n),
)


@given(manifest_body)
@example(b"[" * 100_000)
@example(b'{"schemaVersion": 2, "manifests": ' + b"[" * 100_000)
def test_any_body_is_a_manifest_type_or_not_a_manifest(body: bytes) -> None:
    try:
        media_type = mediatypes.manifest_type(body)
    except NotAManifest:
        pass
    else:
        assert media_type in mediatypes.KNOWN_TYPES
    described = mediatypes.describe(body)  # never raises: malformed entries are skipped
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}", d) for d in described.children)


# --- Authorization ---------------------------------------------------------------------------------

_secret = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@given(
    st.one_of(
        nasty_text,
        st.builds(
            lambda s, p: f"{s} {p}",
            st.sampled_from(["Basic", "basic", "Bearer", "BEARER", "Digest"]),
            nasty_text,
        ),
        st.builds(
            lambda s, raw: f"{s} {base64.b64encode(raw).decode()}",
            st.sampled_from(["Basic", "Bearer"]),
            st.binary(max_size=64),
        ),
        st.just("Basic " + "A" * 5000),
    )
)
def test_any_authorization_is_a_credential_or_bad_credentials(value: str) -> None:
    try:
        cred = authorization.parse(value)
    except BadCredentials as exc:
        param = value.strip().partition(" ")[2].strip()
        assert len(param) < 4 or param not in str(exc)  # the message never quotes it
        return
    assert isinstance(cred, Basic | Bearer)
    if isinstance(cred, Basic):
        assert not re.search(r"[\x00-\x1f\x7f]", cred.username + cred.password)


@given(_secret.filter(lambda u: ":" not in u), _secret)
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    value = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        cred = authorization.parse(value)
    except BadCredentials:
        assert re.search(r"[\x00-\x1f\x7f]", user + password) or len(value) > authorization.MAX_HEADER
        return
    assert cred == Basic(user, password)


@given(nasty_text)
def test_a_challenge_never_breaks_out_of_its_quotes(repository: str) -> None:
    realm = f"http://{proxy_address(repository, '127.0.0.1:5000')}/auth/token"
    header = authorization.challenge(realm, authorization.pull_scope(repository))
    assert not re.search(r"[\x00-\x1f\x7f]", header)
    params = re.fullmatch(r'Bearer ((?:[a-z]+="[^"\\]*",?)+)', header)
    assert params is not None, header
    keys = re.findall(r'([a-z]+)="', params.group(1))
    assert keys in (["realm", "service"], ["realm", "service", "scope"])


# --- Host -----------------------------------------------------------------------------------------

host_header = st.one_of(
    nasty_text,
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}[a-z0-9](:[0-9]{1,6})?", fullmatch=True),
    st.from_regex(r"\[[0-9a-f:]{2,20}\](:[0-9]{1,5})?", fullmatch=True),
    st.builds(lambda h, junk: h + junk, st.sampled_from(["cache.example:5000", "[::1]:5000"]), nasty_text),
)


@given(host_header)
@example("İ")  # Unicode case folding let it through as [a-z], then lower() made "i" + U+0307
@example("\u212a.example")  # the Kelvin sign folds to "k"
@example("cache.ıo:5000")  # dotless i
def test_a_host_header_is_a_plain_address_or_the_fallback(header: str) -> None:
    got = proxy_address(header, "127.0.0.1:5000")
    assert got == "127.0.0.1:5000" or got == header.lower()
    assert re.fullmatch(r"[a-z0-9.\-\[\]:]+", got)
    _host, colon, port = got.rpartition(":")
    if colon and not got.endswith("]"):
        assert 0 < int(port) < 65536


# --- tags/list paging, next-page links --------------------------------------------------------------

_link_value = st.one_of(st.text(_LOWER + "._-:+", min_size=1, max_size=10), nasty_text)


@given(
    st.one_of(
        nasty_text,
        st.builds(
            lambda base, n, last, rel: f"<{base}?n={n}&last={last}&x=1>; rel={rel}",
            st.sampled_from(
                ["/v2/a/tags/list", "https://up.example/v2/a/tags/list", "", "//evil/x", "http://[::1"]
            ),
            _link_value,
            _link_value,
            st.sampled_from(['"next"', "next", '"prev"', '"next" ; x=1']),
        ),
    ),
    valid_name,
    st.one_of(st.just({}), st.sampled_from(UPSTREAMS).map(lambda ns: {"ns": ns})),
)
def test_next_links_point_at_us_with_only_paging_and_routing(
    link: str, name: str, routing: dict[str, str]
) -> None:
    our_path = f"/v2/{name}/tags/list"
    got = next_link(link, our_path, routing)
    if got is None:
        return
    match = re.fullmatch(r'<([^<>"\s]*)>; rel="next"', got)
    assert match is not None, got
    path, _, query = match.group(1).partition("?")
    assert path == our_path
    keys = {pair.partition("=")[0] for pair in query.split("&") if pair}
    assert keys <= {*PAGING, *routing}
    assert routing.items() <= dict(p.partition("=")[::2] for p in query.split("&") if p).items()


# --- image references --------------------------------------------------------------------------------


@given(
    st.one_of(
        nasty_text,
        st.builds(
            lambda reg, name, tag, dig: f"{reg}{name}{tag}{dig}",
            st.sampled_from(
                ["", "docker.io/", "ghcr.io/", "localhost:5000/", "index.docker.io/", "evil.example/"]
            ),
            valid_name,
            st.one_of(st.just(""), valid_tag.map(lambda t: f":{t}")),
            st.one_of(st.just(""), valid_digest.map(lambda d: f"@{d}")),
        ),
    )
)
def test_image_references_round_trip_or_are_bad_references(text: str) -> None:
    try:
        ref = parse_image_reference(text, UPSTREAMS, UPSTREAMS[0])
    except BadReference:
        return
    assert ref.upstream in UPSTREAMS
    assert NAME_RE.fullmatch(ref.repository)
    assert ref.tag is not None or ref.digest is not None
    assert parse_image_reference(str(ref), UPSTREAMS, UPSTREAMS[0]) == ref


# --- config values ------------------------------------------------------------------------------------

config_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(),
        nasty_text,
        st.sampled_from(["9" * 5000, "1e999", "nan", "inf", "-1", "0", "10GiB", "5m", "forever", "never",
                         "127.0.0.1:0", "http://[::1", "http://user:pw@h", "https://h/x?y", "a\x00b",
                         "*a", "&a [*a]"]),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(nasty_text, inner, max_size=3)),
    max_leaves=8,
)  # fmt: skip


def _config_keys() -> list[str]:
    from proxy.core.config import PARSERS

    return sorted(PARSERS)


@given(st.sampled_from(_config_keys()), config_value)
@example("cache_dir", "a\x00b")
@example("auth", "[" * 1000)
@example("auth", "{a: " * 1000)
@example("upstreams", {"docker.io": "http://[::1"})
def test_any_config_value_is_a_setting_or_a_config_error(key: str, value: Any) -> None:
    from proxy.core.config import build
    from proxy.core.configvalues import ConfigError

    try:
        build({key: value})
    except ConfigError as exc:
        assert str(exc).startswith(exc.key)
