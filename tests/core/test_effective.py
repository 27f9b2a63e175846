"""The effective settings the start-up log shows: everything an operator needs to see, and no
secret."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from proxy.core.authconfig import AccessRule, AuthConfig
from proxy.core.config import Settings, TagRule, UpstreamConfig
from proxy.core.effective import effective

PASSWORD = "upstream-Pa55word-xyz"
STATIC_TOKENS = "ci:static-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def test_everything_but_the_secrets(tmp_path: Path) -> None:
    settings = replace(
        Settings(),
        listen_host="::1",
        cache_dir=tmp_path,
        offline=True,
        tag_ttl=None,
        tag_rules=(TagRule(re.compile(r"v\d+"), 3600.0),),
        pins=("docker.io/library/alpine:3.20",),
        upstreams=(
            UpstreamConfig("docker.io", "https://registry-1.docker.io", username="me", password=PASSWORD),
            UpstreamConfig("ghcr.io", "https://ghcr.io", credential_command="print-token"),
        ),
        auth=AuthConfig(
            tokens_env="OCICACHE_TOKENS",
            env_tokens=STATIC_TOKENS,
            anonymous=False,
            rules=(AccessRule(users=("ci",), upstreams=("ghcr.io",)),),
        ),
        admin_token=ADMIN,
    )
    shown = effective(settings)
    text = json.dumps(shown)
    for secret in (PASSWORD, STATIC_TOKENS, "static-token-0123456789abcdef", ADMIN, "print-token"):
        assert secret not in text
    assert shown["listen"] == "http://[::1]:5000"
    assert shown["offline"] is True
    assert shown["tag_ttl"] == "forever"
    assert shown["tag_rules"] == [{"pattern": r"v\d+", "ttl": 3600.0}]
    assert [u["credentials"] for u in shown["upstreams"]] == ["password", "helper"]
    assert shown["upstreams"][0]["username"] == "me"
    assert shown["auth"]["tokens_env"] == "OCICACHE_TOKENS"
    assert shown["auth"]["rules"][0]["users"] == ["ci"]
    assert shown["admin_api"] is True
    assert shown["budget"] == settings.max_cache_bytes
