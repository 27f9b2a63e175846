"""Pure: credentials from a Docker config.json, and the resolver's refusal of private space."""

from __future__ import annotations

import base64
import socket

from aiohttp.abc import ResolveResult

from proxy.core.upstreamauth import resolved_allowed
from proxy.upstream.credentials import lookup, parse_auths
from proxy.upstream.resolver import GuardedResolver


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_parse_auths_and_lookup_with_docker_hub_aliases() -> None:
    auths = parse_auths(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": b64("hubuser:hubtoken")},
                "ghcr.io": {"auth": b64("gh:pat:with:colons")},
                "registry.internal:5000": {"username": "u", "password": "p"},
                "broken.io": {"auth": "not base64!"},
                "empty.io": {},
            },
            "credsStore": "desktop",
        }
    )
    assert lookup(auths, "docker.io", "https://registry-1.docker.io") == ("hubuser", "hubtoken")
    assert lookup(auths, "ghcr.io", "https://ghcr.io") == ("gh", "pat:with:colons")
    assert lookup(auths, "internal", "https://registry.internal:5000") == ("u", "p")
    assert lookup(auths, "broken.io", "https://broken.io") is None
    assert lookup(auths, "quay.io", "https://quay.io") is None
    assert parse_auths({"auths": []}) == {} and parse_auths("nonsense") == {}


def test_resolved_allowed() -> None:
    trusted = frozenset({"registry.internal"})
    assert resolved_allowed("registry.internal", ["10.1.2.3"], trusted) == ["10.1.2.3"]
    assert resolved_allowed("cdn.example.com", ["10.1.2.3", "93.184.216.34"], trusted) == ["93.184.216.34"]
    assert resolved_allowed("rebind.example.com", ["169.254.169.254", "127.0.0.1", "::1"], trusted) == []


class StubResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        return None


async def test_guarded_resolver_refuses_names_that_resolve_into_private_space() -> None:
    resolver = GuardedResolver(frozenset({"registry.internal"}))
    resolver._inner = StubResolver(  # type: ignore[assignment]
        {
            "registry.internal": ["10.0.0.5"],
            "evil.example.com": ["169.254.169.254"],
            "cdn.example.com": ["8.8.8.8"],
        }
    )
    assert [r["host"] for r in await resolver.resolve("registry.internal", 443)] == ["10.0.0.5"]
    assert [r["host"] for r in await resolver.resolve("cdn.example.com", 443)] == ["8.8.8.8"]
    try:
        await resolver.resolve("evil.example.com", 80)
    except OSError as exc:
        assert "does not dial" in str(exc)
    else:
        raise AssertionError("resolved into link-local space")
