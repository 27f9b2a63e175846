"""Authorization headers as clients send them, hostile ones too, and the challenge."""

from __future__ import annotations

import base64

import pytest

from proxy.core.authorization import MAX_HEADER, BadCredentials, Basic, Bearer, challenge, parse, pull_scope


def basic(text: bytes) -> str:
    return "Basic " + base64.b64encode(text).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic(b"ci:s3cret"), Basic("ci", "s3cret")),
        (basic(b"ci:pass:with:colons"), Basic("ci", "pass:with:colons")),
        (basic("jürgen:пароль".encode()), Basic("jürgen", "пароль")),
        ("basic " + base64.b64encode(b"a:b").decode(), Basic("a", "b")),  # scheme is case-insensitive
        ("Bearer abc.def-ghi_jkl~+/==", Bearer("abc.def-ghi_jkl~+/==")),
        ("BEARER tok", Bearer("tok")),
        (basic(b":"), Basic("", "")),
    ],
)
def test_parses_basic_and_bearer(header: str, expected: Basic | Bearer) -> None:
    assert parse(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        basic(b"no-colon-here"),
        "Basic not*base64",
        "Basic " + base64.b64encode(b"a:b").decode()[:-1],  # bad padding
        basic(b"\xff\xfe:\xfd"),  # not UTF-8
        basic(b"ci:pass\nword"),
        "Basic",
        "Bearer",
        "Bearer has space",
        'Bearer "quoted"',
        "Digest username=x",
        "Negotiate abc",
        "Basic " + "A" * (MAX_HEADER + 10),
        "Bearer t\udcff",  # aiohttp hands non-UTF-8 header bytes over as surrogates
        "Basic YTpi\u00e9",
        "",
    ],
)
def test_refuses_malformed_headers_without_quoting_them(header: str) -> None:
    with pytest.raises(BadCredentials) as info:
        parse(header)
    if len(header) > 8:
        assert header[6:] not in str(info.value)


def test_reprs_hide_secrets() -> None:
    assert "s3cret" not in repr(Basic("ci", "s3cret"))
    assert "tok" not in repr(Bearer("tok"))


def test_challenge_is_the_token_auth_spec_form() -> None:
    got = challenge("https://proxy:5000/auth/token", pull_scope("library/alpine"))
    assert got == (
        'Bearer realm="https://proxy:5000/auth/token",service="ocicache",'
        'scope="repository:library/alpine:pull"'
    )
    assert challenge("http://p/auth/token") == 'Bearer realm="http://p/auth/token",service="ocicache"'


def test_challenge_never_carries_a_quote_out_of_its_string() -> None:
    assert "scope" not in challenge("http://p/auth/token", 'repository:a",evil="1:pull')
    with pytest.raises(ValueError):
        challenge('http://p"/auth/token')
