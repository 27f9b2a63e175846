"""Pure: the effective settings as the start-up log line shows them, without a secret.

Passwords, tokens and the admin token are never shown, only where they come from (a variable's
name, a file's path, "password" or "helper"), so an operator can tell what is in force and a
log collector learns nothing it should not hold.
"""

from __future__ import annotations

from typing import Any

from proxy.core.config import Settings, UpstreamConfig
from proxy.core.listenaddr import url


def _credentials(up: UpstreamConfig, docker_config: bool) -> str:
    if up.credential_command is not None:
        return "helper"
    if up.username is not None and up.password is not None:
        return "password"
    return "docker_config" if docker_config else "none"


def _ttl(value: float | None) -> float | str:
    return "forever" if value is None else value


def effective(settings: Settings) -> dict[str, Any]:
    s = settings
    auth = s.auth
    return {
        "listen": url("https" if s.tls is not None else "http", s.listen_host, s.listen_port),
        "cache_dir": str(s.cache_dir),
        "budget": s.max_cache_bytes,
        "watermarks": [s.low_watermark, s.high_watermark],
        "max_unused": _ttl(s.max_unused) if s.max_unused is not None else "never",
        "offline": s.offline,
        "workers": s.processes,
        "tag_ttl": _ttl(s.tag_ttl),
        "tag_rules": [{"pattern": r.pattern.pattern, "ttl": _ttl(r.ttl)} for r in s.tag_rules],
        "pins": list(s.pins),
        "upstreams": [
            {
                "name": up.name,
                "url": up.url,
                "username": up.username,
                "credentials": _credentials(up, s.docker_config is not None),
                "tag_ttl": "forever" if up.tag_ttl_forever else up.tag_ttl,
                "keep_deleted": up.keep_deleted,
            }
            for up in s.upstreams
        ],
        "timeouts": {
            "manifest": s.manifest_timeout,
            "blob_connect": s.blob_connect_timeout,
            "blob_read": s.blob_read_timeout,
        },
        "blob_retries": s.blob_retries,
        "upstream_blob_connections": s.upstream_blob_connections,
        "verified_ranges_only": s.verified_ranges_only,
        "cancel_abandoned_fills": s.cancel_abandoned_fills,
        "auth": {
            "enabled": auth.enabled,
            "htpasswd": None if auth.htpasswd is None else str(auth.htpasswd),
            "tokens_file": None if auth.tokens_file is None else str(auth.tokens_file),
            "tokens_env": auth.tokens_env,  # the variable's name, not its value
            "anonymous": auth.anonymous,
            "rules": [
                {
                    "users": list(r.users),
                    "anonymous": r.anonymous,
                    "upstreams": None if r.upstreams is None else list(r.upstreams),
                    "repositories": list(r.repositories),
                    "deny": r.deny,
                }
                for r in auth.rules
            ],
        },
        "tls": None
        if s.tls is None
        else {
            "cert": str(s.tls.cert),
            "client_ca": None if s.tls.client_ca is None else str(s.tls.client_ca),
        },
        "admin_api": s.admin_token is not None,
        "docker_config": None if s.docker_config is None else str(s.docker_config),
    }
