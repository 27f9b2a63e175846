"""Pure: the ``cluster:`` settings (replicas sharing state through Redis), read and checked once,
with errors that name their key.

``cluster.redis`` turns the cluster on. Peers stream blobs to each other with ordinary OCI blob
GETs authenticated with a shared token (``cluster.token_env`` names the variable holding it),
and find each other by the URL each replica advertises (``cluster.advertise``; by default the
listen address, with this host's name for a wildcard one).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Final

from yarl import URL

from proxy.core.configvalues import ConfigError, parse_mapping, parse_seconds, parse_text

# A shared secret that every replica sends and checks: long enough not to be guessed.
TOKEN_MIN: Final = 16
CLUSTER_KEYS: Final = {"redis", "advertise", "token_env", "lease_ttl", "timeout", "negative_ttl"}
_REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    redis: str | None = field(default=None, repr=False)  # may carry a password
    advertise: str | None = None
    token_env: str | None = None
    # The token's value, read once with the rest of the settings; never logged.
    token: str = field(default="", repr=False)
    # A fill's lease lives this long unless its holder renews it (every third of it).
    lease_ttl: float = 10.0
    # Every Redis command gets this long; past it the replica runs on alone (degraded).
    timeout: float = 1.0
    # An upstream 404 is remembered for the other replicas this long.
    negative_ttl: float = 15.0

    @property
    def enabled(self) -> bool:
        return self.redis is not None


def parse_cluster(key: str, value: Any) -> ClusterConfig:
    spec = parse_mapping(key, value, CLUSTER_KEYS)
    defaults = ClusterConfig()
    redis = spec.get("redis")
    if redis is not None:
        redis = parse_text(f"{key}.redis", redis).strip()
        if URL(redis).scheme not in _REDIS_SCHEMES:
            raise ConfigError(f"{key}.redis", "expected a redis://, rediss:// or unix:// URL")
    advertise = spec.get("advertise")
    if advertise is not None:
        advertise = parse_advertise(f"{key}.advertise", advertise)
    token_env = spec.get("token_env")
    token = ""
    if token_env is not None:
        token_env = parse_text(f"{key}.token_env", token_env)
        token = os.environ.get(token_env, "")
        if len(token) < TOKEN_MIN:
            raise ConfigError(
                f"{key}.token_env",
                f"environment variable {token_env} must hold at least {TOKEN_MIN} characters",
            )
    if redis is not None and token_env is None:
        raise ConfigError(f"{key}.token_env", "required with cluster.redis: peers authenticate with it")
    lease_ttl = parse_seconds(f"{key}.lease_ttl", spec.get("lease_ttl", defaults.lease_ttl))
    if lease_ttl < 0.3:
        raise ConfigError(f"{key}.lease_ttl", "at least 0.3 s (it is renewed every third of it)")
    timeout = parse_seconds(f"{key}.timeout", spec.get("timeout", defaults.timeout))
    if timeout <= 0 or timeout >= lease_ttl:
        raise ConfigError(f"{key}.timeout", "must be above 0 and below lease_ttl")
    negative_ttl = parse_seconds(f"{key}.negative_ttl", spec.get("negative_ttl", defaults.negative_ttl))
    return ClusterConfig(
        redis=redis,
        advertise=advertise,
        token_env=token_env,
        token=token,
        lease_ttl=lease_ttl,
        timeout=timeout,
        negative_ttl=negative_ttl,
    )


def parse_advertise(key: str, value: Any) -> str:
    url = URL(parse_text(key, value).strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(key, f"expected an http(s) URL, got {value!r}")
    if url.user is not None or url.query_string or url.fragment or url.path not in ("", "/"):
        raise ConfigError(key, "a bare http(s)://host:port, without credentials, path or query")
    return str(url.with_path("")).rstrip("/")


def advertised(cluster: ClusterConfig, host: str, port: int, *, tls: bool) -> str:
    """The URL peers reach this replica at: ``advertise``, else the listen address (a wildcard
    one named by this host's fully qualified name, which a headless Service resolves)."""
    if cluster.advertise is not None:
        return cluster.advertise
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"
