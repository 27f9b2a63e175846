"""auth.rules: first match decides, globs stay within components unless **."""

from __future__ import annotations

import pytest

from proxy.core.authconfig import AccessRule
from proxy.core.rules import Rules, glob_regex

# The example: anonymous clients may pull the public upstreams; ci may pull internal too.
EXAMPLE = Rules(
    [
        AccessRule(anonymous=True, upstreams=("docker.io", "ghcr.io")),
        AccessRule(users=("ci",), upstreams=("internal",), repositories=("team/secret/**",), deny=True),
        AccessRule(users=("ci",), upstreams=("internal",)),
        AccessRule(users=("*",), upstreams=("internal",), repositories=("public/*",)),
    ]
)


@pytest.mark.parametrize(
    ("user", "upstream", "repository", "allowed"),
    [
        (None, "docker.io", "library/alpine", True),
        (None, "ghcr.io", "org/tool", True),
        (None, "internal", "team/app", False),
        ("ci", "docker.io", "library/alpine", True),  # anonymous: true covers logged-in users
        ("ci", "internal", "team/app", True),
        ("ci", "internal", "team/secret/keys", False),  # the deny comes first
        ("ci", "internal", "team/secret", True),  # ** needs something after the slash
        ("dev", "internal", "team/app", False),
        ("dev", "internal", "public/base", True),  # "*": any logged-in user
        ("dev", "internal", "public/base/deep", False),  # * stays within a component
        (None, "internal", "public/base", False),  # "*" is not anonymous
        ("ci", "quay.io", "x/y", False),  # nothing matches: refused
    ],
)
def test_example_rules(user: str | None, upstream: str, repository: str, allowed: bool) -> None:
    assert EXAMPLE.allows(user, upstream, repository) is allowed


def test_no_rules_allow_everything() -> None:
    assert Rules([]).allows(None, "x", "y")
    assert not Rules([])


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("library/*", "library/alpine", True),
        ("library/*", "library/a/b", False),
        ("**", "a/b/c", True),
        ("team/**", "team/a/b", True),
        ("team/**", "team", False),
        ("app-?", "app-1", True),
        ("app-?", "app-12", False),
        ("a.b", "aXb", False),  # a dot is a dot
        ("*", "", True),
    ],
)
def test_globs(glob: str, name: str, matches: bool) -> None:
    assert bool(glob_regex(glob).fullmatch(name)) is matches
