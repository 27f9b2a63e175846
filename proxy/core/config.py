"""Typed, frozen settings, read once.

Precedence, lowest first: the embedded defaults below, a YAML file (``--config``), environment
variables ``OCICACHE_<KEY>``, command-line flags. Every key has one name used in all four
places (``cache_dir`` / ``OCICACHE_CACHE_DIR`` / ``--cache-dir``), and every error names its key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from yarl import URL

from proxy.core.authconfig import AuthConfig, TlsConfig, check_rule_upstreams, parse_auth, parse_tls
from proxy.core.clusterconfig import CLUSTER_KEYS, ClusterConfig, parse_cluster
from proxy.core.configvalues import (
    ConfigError,
    load_yaml,
    parse_bool,
    parse_choice,
    parse_fraction,
    parse_int,
    parse_listen,
    parse_mapping,
    parse_optional_seconds,
    parse_path,
    parse_seconds,
    parse_size,
    parse_text,
    parse_ttl,
)
from proxy.core.imageref import BadReference, parse_image_reference
from proxy.core.referrers import is_fallback_tag

# workers: auto runs one process per CPU up to this many (measured on 2 cores; each process
# costs about 50 MiB).
AUTO_WORKERS_MAX: Final = 8


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream registry, by the name clients use for it (``docker.io``, ``ghcr.io``)."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # A command printing "user:secret" or a bare token (ECR/GCR helpers); its answer is cached.
    credential_command: str | None = None
    credential_ttl: float = 600.0
    # Token realms on hosts other than the upstream's own domain that we agree to send credentials to.
    realm_hosts: tuple[str, ...] = ()
    # This upstream's tag TTL, instead of the global one (None: the global; see Settings.ttl_for).
    tag_ttl: float | None = None
    tag_ttl_forever: bool = False
    # When upstream answers 404 for a tag we hold, keep serving ours (with a warning).
    keep_deleted: bool = False


@dataclass(frozen=True, slots=True)
class TagRule:
    """Tags whose name matches ``pattern`` (whole) are trusted for ``ttl`` seconds, or forever."""

    pattern: re.Pattern[str]
    ttl: float | None


# The registries people pull from most, at their real API endpoints. The first is the default
# for requests that name no registry (a Docker daemon's registry-mirrors only sends Docker Hub).
DEFAULT_UPSTREAMS: Final[tuple[UpstreamConfig, ...]] = (
    UpstreamConfig("docker.io", "https://registry-1.docker.io", realm_hosts=("auth.docker.io",)),
    UpstreamConfig("ghcr.io", "https://ghcr.io"),
    UpstreamConfig("quay.io", "https://quay.io"),
    UpstreamConfig("registry.k8s.io", "https://registry.k8s.io"),
    UpstreamConfig("gcr.io", "https://gcr.io"),
    UpstreamConfig("public.ecr.aws", "https://public.ecr.aws"),
    UpstreamConfig("mcr.microsoft.com", "https://mcr.microsoft.com"),
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ocicache"


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    cache_dir: Path = field(default_factory=default_cache_dir)
    upstreams: tuple[UpstreamConfig, ...] = DEFAULT_UPSTREAMS
    # How long a tag -> digest answer is trusted before upstream is asked again (None: forever).
    tag_ttl: float | None = 60.0
    # First match wins; then the upstream's tag_ttl; then tag_ttl.
    tag_rules: tuple[TagRule, ...] = ()
    # Never open a connection to any upstream; serve what the cache holds, whatever its age.
    offline: bool = False
    # Image references whose index, manifests, configs and layers are never evicted.
    pins: tuple[str, ...] = ()
    # Disk budget for cached blobs; eviction (least recently used first) keeps below it:
    # it starts above high_watermark of the budget and stops below low_watermark.
    max_cache_bytes: int = 20 * 1024**3
    high_watermark: float = 1.0
    low_watermark: float = 0.9
    # Files nobody asked for in this long are removed (None: never).
    max_unused: float | None = None
    manifest_timeout: float = 30.0
    blob_connect_timeout: float = 15.0
    # A blob download that receives nothing for this long is broken and resumed.
    blob_read_timeout: float = 60.0
    blob_retries: int = 3
    # Upper bound for tags/list ?n=, so one request cannot ask upstream for everything.
    tags_page_max: int = 1000
    # How long a subject's referrers answer (and its fallback tag) is trusted (None: forever).
    referrers_ttl: float | None = 60.0
    # Descriptors per subject: upstream's pages are followed up to this many, and no more kept.
    referrers_max: int = 1024
    # How long we remember whether an upstream has the referrers API.
    referrers_api_ttl: float = 3600.0
    # When every client of a download has left: finish it to warm the cache (False) or stop.
    cancel_abandoned_fills: bool = False
    # Blob downloads open at once per upstream; more wait their turn (never time out waiting).
    upstream_blob_connections: int = 64
    # A cold blob larger than the threshold is fetched as this many ranged GETs at once
    # (1: one stream). Each counts against upstream_blob_connections.
    fill_connections: int = 4
    parallel_fill_threshold: int = 32 * 1024 * 1024
    # What one of those GETs asks for; the connections take chunks in order.
    fill_chunk: int = 8 * 1024 * 1024
    # A range request for bytes this far beyond what a download has reached gets them from a
    # ranged upstream request of its own (lazy pullers), instead of waiting.
    lazy_range_gap: int = 8 * 1024 * 1024
    # ... if it asks for at most this many bytes: a lazy read. Longer ranges (containerd's 8 MiB
    # chunks, open-ended bytes=N-) are a pull in parts, which the download itself serves without
    # a second copy of the blob coming down the same link; so is any range once this download's
    # lazy reads have cost an eighth of its size.
    lazy_range_max: int = 4 * 1024 * 1024
    # A Range request during a download is answered as the bytes arrive, before the digest is
    # checked (what lazy pullers need), unless this makes it wait for the verified whole.
    verified_ranges_only: bool = False
    # Client connections. A request's head (and a body the proxy reads) must arrive within
    # header_timeout of its first byte; a connection with no request under way is closed after
    # idle_timeout; one address (an IPv6 /64) may hold max_connections_per_address (0: no
    # limit); a connection is closed after max_requests_per_connection answers.
    header_timeout: float = 15.0
    idle_timeout: float = 60.0
    max_connections_per_address: int = 256
    max_requests_per_connection: int = 1000
    # Processes serving the one port (SO_REUSEPORT): the primary, which owns the cache, and
    # workers-1 front workers that answer warm requests and relay the rest to it. 0 (auto):
    # one per CPU this process may run on, at most AUTO_WORKERS_MAX; 1 with cluster:.
    workers: int = 0
    log_level: str = "info"
    # auto: a readable console format when stderr is a terminal, JSON lines otherwise.
    log_format: str = "auto"
    # A Docker config.json whose "auths" supply credentials to upstreams that have none.
    docker_config: Path | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    # The admin API (/admin/v1/) is on only with a token: the variable admin_token_env names,
    # or OCICACHE_ADMIN_TOKEN. Read by load(), never written anywhere.
    admin_token_env: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    # Replicas sharing state through Redis (off without cluster.redis).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def default_upstream(self) -> UpstreamConfig:
        return self.upstreams[0]

    def upstream(self, name: str) -> UpstreamConfig | None:
        for up in self.upstreams:
            if up.name == name:
                return up
        return None

    @property
    def processes(self) -> int:
        """How many processes ``serve`` runs (``workers``, resolved)."""
        if self.workers:
            return self.workers
        if self.cluster.enabled:
            return 1
        return max(1, min(usable_cpus(), AUTO_WORKERS_MAX))

    def ttl_for(self, upstream: UpstreamConfig, tag: str) -> float | None:
        """Seconds a tag's answer is trusted; None for forever."""
        for rule in self.tag_rules:
            if rule.pattern.fullmatch(tag):
                return rule.ttl
        if is_fallback_tag(tag):
            # The referrers tag schema's index changes as a subject's referrers do.
            return self.referrers_ttl
        if upstream.tag_ttl_forever:
            return None
        return upstream.tag_ttl if upstream.tag_ttl is not None else self.tag_ttl


def cpu_quota(cpu_max: str) -> int | None:
    """Whole CPUs a cgroup v2 ``cpu.max`` (``"200000 100000"``: quota and period) allows,
    rounded up; None for no limit (``"max ..."``) or anything unreadable."""
    quota, _, period = cpu_max.strip().partition(" ")
    if not (quota.isascii() and quota.isdigit() and period.isascii() and period.isdigit()):
        return None
    if int(period) == 0 or len(quota) > 18 or len(period) > 18:
        return None
    return max(1, -(-int(quota) // int(period)))


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, and its container's quota if it has one
    (a pod limited to 2 CPUs on a 64-core node should run 2 processes, not 64)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota = cpu_quota(Path("/sys/fs/cgroup/cpu.max").read_text())
    except (OSError, UnicodeDecodeError):
        quota = None
    return cpus if quota is None else min(cpus, quota)


# --- parsing of single values; each raises ConfigError naming the key -------------------------


def parse_positive_seconds(key: str, value: Any) -> float:
    seconds = parse_seconds(key, value)
    if seconds <= 0:
        # 0 would close every connection at once, not turn the limit off.
        raise ConfigError(key, f"must be more than 0 seconds, got {value!r}")
    return seconds


_UPSTREAM_NAME: Final = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5})?|_default")


def parse_budget(key: str, value: Any) -> int:
    size = parse_size(key, value)
    if size == 0:
        # People read 0 as "unlimited"; it would mean caching nothing at all.
        raise ConfigError(key, "0 would cache nothing; for no limit of its own, give the disk's size")
    return size


def parse_tag_rules(key: str, value: Any) -> tuple[TagRule, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(key, "expected a list of {pattern: REGEX, ttl: DURATION|forever}")
    rules = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping) or set(item) != {"pattern", "ttl"}:
            raise ConfigError(where, "expected {pattern: REGEX, ttl: DURATION|forever}")
        try:
            pattern = re.compile(parse_text(f"{where}.pattern", item["pattern"]))
        except re.error as exc:
            raise ConfigError(f"{where}.pattern", f"not a regular expression: {exc}") from None
        rules.append(TagRule(pattern, parse_ttl(f"{where}.ttl", item["ttl"])))
    return tuple(rules)


def parse_pins(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]  # the environment: a,b,c
    if not isinstance(value, list | tuple):
        raise ConfigError(key, "expected a list of image references")
    return tuple(parse_text(f"{key}[{i}]", v).strip() for i, v in enumerate(value))


def parse_upstream(key: str, name: str, spec: Any) -> UpstreamConfig:
    if not _UPSTREAM_NAME.fullmatch(name):
        raise ConfigError(key, f"invalid registry name {name!r} (e.g. docker.io, host:5000)")
    where = f"{key}.{name}"
    if isinstance(spec, str):
        spec = {"url": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(where, "expected a URL or a mapping with url:")
    known = {f.name for f in fields(UpstreamConfig)} - {"name", "tag_ttl_forever"}
    unknown = set(spec) - known - {"password_env"}
    if unknown:
        raise ConfigError(where, f"unknown keys: {', '.join(sorted(map(str, unknown)))}")

    def text(field_name: str) -> str | None:
        value = spec.get(field_name)
        return None if value is None else parse_text(f"{where}.{field_name}", value)

    raw_url = text("url") or ""
    try:
        url = URL(raw_url)
        url.host, url.port  # noqa: B018  (yarl reads the netloc lazily; make it here)
    except ValueError:
        raise ConfigError(f"{where}.url", f"not a URL: {raw_url!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{where}.url", f"expected an http(s) URL, got {spec.get('url')!r}")
    if url.user is not None or url.password is not None:
        # It would sit in clear text in every log line that names the upstream.
        raise ConfigError(
            f"{where}.url", "credentials in the URL are not accepted: use username and password_env"
        )
    if url.query_string or url.fragment:
        raise ConfigError(f"{where}.url", "a registry URL has no query or fragment")
    password = text("password")
    if "password_env" in spec:
        password = os.environ.get(parse_text(f"{where}.password_env", spec["password_env"]))
    ttl = parse_ttl(f"{where}.tag_ttl", spec["tag_ttl"]) if spec.get("tag_ttl") is not None else None
    forever = spec.get("tag_ttl") is not None and ttl is None
    keep_deleted = parse_bool(f"{where}.keep_deleted", spec.get("keep_deleted", False))
    hosts = spec.get("realm_hosts", ())
    if isinstance(hosts, str):
        hosts = [hosts]
    if not isinstance(hosts, list | tuple):
        raise ConfigError(f"{where}.realm_hosts", f"expected a list of host names, got {hosts!r}")
    return UpstreamConfig(
        name=name,
        url=str(url).rstrip("/"),
        username=text("username"),
        password=password,
        credential_command=text("credential_command"),
        credential_ttl=parse_seconds(f"{where}.credential_ttl", spec.get("credential_ttl", 600)),
        realm_hosts=tuple(parse_text(f"{where}.realm_hosts", h) for h in hosts),
        tag_ttl=ttl,
        tag_ttl_forever=forever,
        keep_deleted=keep_deleted,
    )


def parse_upstreams(key: str, value: Any) -> tuple[UpstreamConfig, ...]:
    """A YAML mapping name -> URL or options, or "name=url,name=url" (env), or a list of
    "name=url" (flags). Order matters: the first is the default."""
    items: list[tuple[str, Any]]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str | list | tuple):
        parts = value.split(",") if isinstance(value, str) else list(value)
        items = []
        for part in parts:
            name, sep, url = parse_text(key, part).strip().partition("=")
            if not sep:
                raise ConfigError(key, f"expected NAME=URL, got {part!r}")
            items.append((name.strip(), url.strip()))
    else:
        raise ConfigError(key, f"expected a mapping of registry names to URLs, got {value!r}")
    if not items:
        raise ConfigError(key, "at least one upstream is needed")
    result = tuple(parse_upstream(key, name, spec) for name, spec in items)
    if len({u.name for u in result}) != len(result):
        raise ConfigError(key, "a registry name appears twice")
    return result


ADMIN_TOKEN_VARIABLE: Final = "OCICACHE_ADMIN_TOKEN"
# A token a person can still type, long enough not to be guessed; it travels in a header.
ADMIN_TOKEN_MIN: Final = 16
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_SAFE: Final = re.compile(r"[\x21-\x7e]+")


def parse_env_name(key: str, value: Any) -> str:
    name = parse_text(key, value)
    if not _ENV_NAME.fullmatch(name):
        raise ConfigError(key, f"expected the name of an environment variable, got {name[:100]!r}")
    return name


# key -> parser into Settings field values. "listen" fills two fields.
PARSERS: Final[dict[str, Callable[[str, Any], Any]]] = {
    "listen": parse_listen,
    "cache_dir": parse_path,
    "upstreams": parse_upstreams,
    "tag_ttl": parse_ttl,
    "tag_rules": parse_tag_rules,
    "offline": parse_bool,
    "pins": parse_pins,
    "max_cache_size": parse_budget,
    "high_watermark": parse_fraction,
    "low_watermark": parse_fraction,
    "max_unused": parse_optional_seconds,
    "manifest_timeout": parse_seconds,
    "blob_connect_timeout": parse_seconds,
    "blob_read_timeout": parse_seconds,
    "blob_retries": lambda k, v: parse_int(k, v, maximum=100),
    "tags_page_max": lambda k, v: parse_int(k, v, minimum=1, maximum=100_000),
    "referrers_ttl": parse_ttl,
    "referrers_max": lambda k, v: parse_int(k, v, minimum=1, maximum=100_000),
    "referrers_api_ttl": parse_seconds,
    "cancel_abandoned_fills": parse_bool,
    "upstream_blob_connections": lambda k, v: parse_int(k, v, minimum=1),
    "fill_connections": lambda k, v: parse_int(k, v, minimum=1, maximum=32),
    "parallel_fill_threshold": parse_size,
    "fill_chunk": parse_size,
    "lazy_range_gap": parse_size,
    "lazy_range_max": parse_size,
    "verified_ranges_only": parse_bool,
    "header_timeout": parse_positive_seconds,
    "idle_timeout": parse_positive_seconds,
    "max_connections_per_address": lambda k, v: parse_int(k, v, maximum=1_000_000),
    "max_requests_per_connection": lambda k, v: parse_int(k, v, minimum=1, maximum=10_000_000),
    "workers": lambda k, v: 0 if v == "auto" else parse_int(k, v, minimum=1, maximum=64),
    "log_level": parse_choice(("debug", "info", "warning", "error")),
    "log_format": parse_choice(("auto", "json", "console")),
    "docker_config": parse_path,
    "auth": parse_auth,
    "tls": parse_tls,
    "admin_token_env": parse_env_name,
    "cluster": parse_cluster,
}
_FIELD_OF: Final = {"max_cache_size": "max_cache_bytes"}
# Keys of mapping settings that flags may set one at a time ("cluster.redis": --redis).
_NESTED_FLAGS: Final = {"cluster": ("redis", "advertise")}


def admin_token(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """The admin API's token: from the variable ``admin_token_env`` names (which must then be
    set), else from OCICACHE_ADMIN_TOKEN; None: the admin API is off."""
    name = settings.admin_token_env
    key = "admin_token_env" if name is not None else ADMIN_TOKEN_VARIABLE
    token = environ.get(name) if name is not None else environ.get(ADMIN_TOKEN_VARIABLE)
    if token is None:
        if name is not None:
            raise ConfigError(key, f"environment variable {name} is not set")
        return None
    # Never quoted in an error: it is a secret, whatever is wrong with it.
    if len(token) < ADMIN_TOKEN_MIN:
        raise ConfigError(key, f"the admin token must have {ADMIN_TOKEN_MIN} characters or more")
    if not _HEADER_SAFE.fullmatch(token):
        raise ConfigError(key, "the admin token must be printable ASCII without spaces")
    return token


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text") from None
    data = load_yaml("config", text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping at the top level")
    return data


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        key: environ[f"OCICACHE_{key.upper()}"] for key in PARSERS if f"OCICACHE_{key.upper()}" in environ
    }


def build(*layers: Mapping[str, Any]) -> Settings:
    """Settings from raw layers (YAML, env, flags), later layers winning."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            outer, dot, inner = key.partition(".")
            if dot and outer in _NESTED_FLAGS and inner in _NESTED_FLAGS[outer]:
                # A flag for one key of a mapping (--redis is cluster.redis): it overrides that
                # key and keeps the rest of the mapping from the file or the environment.
                if value is not None:
                    below = merged.get(outer) or {}
                    if isinstance(below, str):
                        below = parse_mapping(outer, below, CLUSTER_KEYS)
                    merged[outer] = {**below, inner: value}
                continue
            if key not in PARSERS:
                raise ConfigError(key, f"unknown setting (known: {', '.join(PARSERS)})")
            if value is not None:
                merged[key] = value
    values: dict[str, Any] = {}
    for key, raw in merged.items():
        parsed = PARSERS[key](key, raw)
        if key == "listen":
            values["listen_host"], values["listen_port"] = parsed
        else:
            values[_FIELD_OF.get(key, key)] = parsed
    settings = Settings(**values)
    if settings.low_watermark >= settings.high_watermark:
        raise ConfigError("low_watermark", "must be below high_watermark")
    names = [u.name for u in settings.upstreams]
    for i, pin in enumerate(settings.pins):
        try:
            parse_image_reference(pin, names, names[0])
        except BadReference as exc:
            raise ConfigError(f"pins[{i}]", str(exc)) from None
    check_rule_upstreams(settings.auth, [u.name for u in settings.upstreams])
    if settings.workers > 1 and settings.cluster.enabled:
        # A replica's peers stream from the process that holds a download's lease: the
        # primary; workers would have to tell them apart. Not built yet.
        raise ConfigError("workers", "several workers are not supported with cluster: yet")
    return settings


def load(
    config_file: Path | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    environ = os.environ if environ is None else environ
    env = read_env(environ)
    file_layer = read_yaml(config_file) if config_file is not None else {}
    settings = build(file_layer, env, flags)
    token = admin_token(settings, environ)
    return settings if token is None else replace(settings, admin_token=token)
