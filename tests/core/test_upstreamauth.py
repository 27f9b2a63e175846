"""Pure upstream-auth decisions: challenges, token URLs, where credentials and redirects may go.
Refusals are tested here, on the decision functions, never by sending traffic anywhere."""

from __future__ import annotations

import pytest
from yarl import URL

from proxy.core.upstreamauth import (
    Token,
    parse_challenge,
    parse_token_response,
    pull_scope,
    realm_allowed,
    redirect_allowed,
    token_request_url,
)


def test_parse_bearer_challenge() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c is not None
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.params["scope"] == "repository:library/alpine:pull"


def test_parse_challenge_with_commas_in_quotes_and_basic() -> None:
    c = parse_challenge('Bearer realm="https://r.io/t",scope="repository:a:pull,push"')
    assert c is not None and c.params["scope"] == "repository:a:pull,push"
    b = parse_challenge('Basic realm="Registry Realm"')
    assert b is not None and b.scheme == "basic"
    assert parse_challenge("") is None


def test_token_request_url_keeps_realm_query() -> None:
    c = parse_challenge('Bearer realm="https://gitlab.com/jwt/auth?x=1",service="container_registry"')
    assert c is not None
    url = token_request_url(c, pull_scope("group/app"))
    assert url.host == "gitlab.com"
    assert dict(url.query) == {
        "x": "1",
        "service": "container_registry",
        "scope": "repository:group/app:pull",
    }


def test_token_response() -> None:
    t = parse_token_response({"token": "abc", "expires_in": 300}, now=1000.0)
    assert t == Token("abc", 1300.0)
    assert parse_token_response({"access_token": "x"}, now=0.0) == Token("x", 60.0)
    assert parse_token_response({"nope": 1}, now=0.0) is None
    assert parse_token_response([], now=0.0) is None
    assert Token("x", 100.0).fresh(now=50.0) and not Token("x", 100.0).fresh(now=99.0)


@pytest.mark.parametrize(
    ("realm", "upstream", "extra", "allowed"),
    [
        ("https://auth.docker.io/token", "https://registry-1.docker.io", (), True),
        ("https://ghcr.io/token", "https://ghcr.io", (), True),
        ("https://gitlab.com/jwt/auth", "https://registry.gitlab.com", (), True),
        ("https://myacr.azurecr.io/oauth2/token", "https://myacr.azurecr.io", (), True),
        ("https://evil.test/token", "https://ghcr.io", (), False),
        ("https://io/token", "https://ghcr.io", (), False),
        ("https://auth.docker.io.evil.test/token", "https://registry-1.docker.io", (), False),
        ("http://auth.docker.io/token", "https://registry-1.docker.io", (), False),
        ("https://sso.example.com/token", "https://r.internal.io", ("sso.example.com",), True),
        # Loopback: same origin only, or a host:port the config names.
        ("http://127.0.0.1:9001/token", "http://127.0.0.1:9000", (), False),
        ("http://127.0.0.1:9000/token", "http://127.0.0.1:9000", (), True),
        ("http://127.0.0.1:9001/token", "http://127.0.0.1:9000", ("127.0.0.1:9001",), True),
        ("http://127.0.0.1:9002/token", "http://127.0.0.1:9000", ("127.0.0.1:9001",), False),
        ("ftp://ghcr.io/token", "https://ghcr.io", (), False),
    ],
)
def test_realm_allowed(realm: str, upstream: str, extra: tuple[str, ...], allowed: bool) -> None:
    assert realm_allowed(URL(realm), URL(upstream), extra) is allowed


@pytest.mark.parametrize(
    ("target", "upstream", "allowed"),
    [
        ("https://production.cloudflare.docker.com/x", "https://registry-1.docker.io", True),
        ("https://pkg-containers.githubusercontent.com/x", "https://ghcr.io", True),
        ("http://169.254.169.254/latest/meta-data/", "https://registry-1.docker.io", False),
        ("http://10.0.0.1/x", "https://ghcr.io", False),
        ("http://172.16.5.4/x", "https://ghcr.io", False),
        ("http://192.168.1.1/x", "https://ghcr.io", False),
        ("http://127.0.0.1:2375/containers/json", "https://ghcr.io", False),
        ("http://localhost:8080/", "https://ghcr.io", False),
        ("http://[::1]:8080/", "https://ghcr.io", False),
        ("http://[fe80::1]/", "https://ghcr.io", False),
        ("http://0.0.0.0/", "https://ghcr.io", False),
        ("file:///etc/passwd", "https://ghcr.io", False),
        # An upstream that itself lives on a private network may redirect within it.
        ("http://10.0.0.9/blob", "http://10.0.0.8:5000", True),
        ("http://127.0.0.1:9001/blob", "http://127.0.0.1:9000", True),
    ],
)
def test_redirect_allowed(target: str, upstream: str, allowed: bool) -> None:
    assert redirect_allowed(URL(target), URL(upstream)) is allowed
