"""Typed, frozen settings, read once.

Precedence, lowest first: the embedded defaults below, a YAML file (``--config``), environment
variables ``OCICACHE_<KEY>``, command-line flags. Every key has one name used in all four
places (``cache_dir`` / ``OCICACHE_CACHE_DIR`` / ``--cache-dir``), and every error names its key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import yaml
from yarl import URL

from proxy.core import accounts
from proxy.core.imageref import BadReference, parse_image_reference


class ConfigError(ValueError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


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


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One entry of ``auth.rules``; see :mod:`proxy.core.rules` for what it means."""

    users: tuple[str, ...] = ()
    anonymous: bool = False
    upstreams: tuple[str, ...] | None = None  # None: every upstream
    repositories: tuple[str, ...] = ("**",)
    deny: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may pull (``auth:``). With no source of credentials and no rules, anyone may."""

    htpasswd: Path | None = None
    tokens_file: Path | None = None
    tokens_env: str | None = None
    # The tokens_env value, read once with the rest of the settings.
    env_tokens: str = field(default="", repr=False)
    # Clients without credentials; off by default once there is a way to log in.
    anonymous: bool = True
    rules: tuple[AccessRule, ...] = ()
    # Lifetime of the tokens the proxy's token endpoint hands out (Docker Hub uses 300 s).
    token_ttl: float = 300.0
    # Password and token guesses one address may make per failure_window seconds.
    max_failures: int = 10
    failure_window: float = 60.0

    @property
    def logins(self) -> bool:
        """Is there a way to log in at all?"""
        return self.htpasswd is not None or self.tokens_file is not None or self.tokens_env is not None

    @property
    def enabled(self) -> bool:
        return self.logins or bool(self.rules) or not self.anonymous


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS on the listener (``tls:``); ``client_ca`` makes client certificates mandatory."""

    cert: Path
    key: Path
    client_ca: Path | None = None


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
    # When every client of a download has left: finish it to warm the cache (False) or stop.
    cancel_abandoned_fills: bool = False
    # Blob downloads open at once per upstream; more wait their turn (never time out waiting).
    upstream_blob_connections: int = 64
    # A Range request during a download is answered as the bytes arrive, before the digest is
    # checked (what lazy pullers need), unless this makes it wait for the verified whole.
    verified_ranges_only: bool = False
    log_level: str = "info"
    log_format: str = "json"
    # A Docker config.json whose "auths" supply credentials to upstreams that have none.
    docker_config: Path | None = None
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None

    @property
    def default_upstream(self) -> UpstreamConfig:
        return self.upstreams[0]

    def upstream(self, name: str) -> UpstreamConfig | None:
        for up in self.upstreams:
            if up.name == name:
                return up
        return None

    def ttl_for(self, upstream: UpstreamConfig, tag: str) -> float | None:
        """Seconds a tag's answer is trusted; None for forever."""
        for rule in self.tag_rules:
            if rule.pattern.fullmatch(tag):
                return rule.ttl
        if upstream.tag_ttl_forever:
            return None
        return upstream.tag_ttl if upstream.tag_ttl is not None else self.tag_ttl


# --- parsing of single values; each raises ConfigError naming the key -------------------------

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_UPSTREAM_NAME: Final = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5})?|_default")


# Longer than any timeout or TTL anyone means; larger numbers overflow the event loop's timers.
_SECONDS_MAX: Final = 10 * 365 * 86400.0
_SIZE_MAX: Final = 2**62
_DIGITS: Final = re.compile(r"[0-9]+")


def _number(value: Any) -> bool:
    # YAML's true/false are ints to Python; a setting that wants a number never means them.
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_text(key: str, value: Any) -> str:
    """A string setting. YAML turns unquoted numbers and lists into other types: say so."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    return value


def parse_size(key: str, value: Any) -> int:
    if _number(value):
        value = str(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", parse_text(key, value))
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, f"not a size: {value!r} (e.g. 500MiB, 20GiB)")
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not size <= _SIZE_MAX:
        raise ConfigError(key, f"too large: {value!r}")
    return int(size)


def parse_budget(key: str, value: Any) -> int:
    size = parse_size(key, value)
    if size == 0:
        # People read 0 as "unlimited"; it would mean caching nothing at all.
        raise ConfigError(key, "0 would cache nothing; for no limit of its own, give the disk's size")
    return size


def parse_seconds(key: str, value: Any) -> float:
    if _number(value):
        result = float(value)
    else:
        text = parse_text(key, value).strip()
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        number, unit = text, "s"
        for suffix in ("ms", "s", "m", "h", "d"):
            if text.endswith(suffix):
                number, unit = text[: -len(suffix)], suffix
                break
        if not re.fullmatch(r"\s*[0-9]+(?:\.[0-9]+)?\s*", number):
            raise ConfigError(key, f"not a duration: {value!r} (e.g. 60, 60s, 5m, 2h, 1d)")
        result = float(number) * scale[unit]
    if math.isnan(result) or result < 0:
        raise ConfigError(key, f"must be a number of seconds, 0 or more, got {value!r}")
    if result > _SECONDS_MAX:
        raise ConfigError(key, f"too long: {value!r} (at most 10 years)")
    return result


def parse_ttl(key: str, value: Any) -> float | None:
    """A duration, or ``forever`` (None)."""
    if isinstance(value, str) and value.strip().lower() in ("forever", "never expires"):
        return None
    return parse_seconds(key, value)


def parse_optional_seconds(key: str, value: Any) -> float | None:
    """A duration, or ``never`` / ``off`` (None)."""
    if isinstance(value, str) and value.strip().lower() in ("never", "off", "none"):
        return None
    return parse_seconds(key, value)


def parse_fraction(key: str, value: Any) -> float:
    """``0.9`` or ``90%``: more than 0, at most 1."""
    text = value.strip() if isinstance(value, str) else value
    percent = isinstance(text, str) and text.endswith("%")
    if percent:
        text = text[:-1].strip()
    try:
        result = float(text) if _number(text) or isinstance(text, str) else math.nan
    except ValueError:
        result = math.nan
    if percent:
        result /= 100
    if not 0 < result <= 1:
        raise ConfigError(key, f"expected a fraction of the budget, like 0.9 or 90%, got {value!r}")
    return result


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


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, f"not a boolean: {value!r}")


def parse_int(key: str, value: Any, minimum: int = 0, maximum: int = 1_000_000) -> int:
    """A whole number: an int, or a string of digits (the environment). 1.9 is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        result = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()) and len(value.strip()) < 10:
        result = int(value.strip())
    else:
        raise ConfigError(key, f"not a whole number: {value!r}")
    if not minimum <= result <= maximum:
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {result}")
    return result


def parse_listen(key: str, value: Any) -> tuple[str, int]:
    host, sep, port = parse_text(key, value).rpartition(":")
    if not sep or not _DIGITS.fullmatch(port) or len(port) > 5 or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_path(key: str, value: Any) -> Path:
    return Path(parse_text(key, value)).expanduser()


def parse_choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


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
    url = URL(raw_url)
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


def _mapping(key: str, value: Any, known: set[str]) -> Mapping[str, Any]:
    if isinstance(value, str):
        # From the environment: a YAML flow mapping, OCICACHE_AUTH='{htpasswd: /etc/htpasswd}'.
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(key, "expected a mapping") from None
    if not isinstance(value, Mapping):
        raise ConfigError(key, "expected a mapping")
    unknown = set(map(str, value)) - known
    if unknown:
        raise ConfigError(
            key, f"unknown keys: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list")
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, "expected a list of names")
    return tuple(value)


def _read_text(key: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None


_REPOSITORY_GLOB: Final = re.compile(r"[a-z0-9._/*?-]+")
_RULE_KEYS: Final = {"users", "anonymous", "upstreams", "repositories", "deny"}


def parse_rule(key: str, value: Any, *, anonymous: bool, logins: bool) -> AccessRule:
    spec = _mapping(key, value, _RULE_KEYS)
    users = _strings(f"{key}.users", spec["users"]) if "users" in spec else ()
    anon = parse_bool(f"{key}.anonymous", spec.get("anonymous", False))
    if "anonymous" in spec and not anon:
        raise ConfigError(f"{key}.anonymous", "only anonymous: true means something; give users: instead")
    if bool(users) == anon:
        raise ConfigError(key, "give users: [...] or anonymous: true (one of them)")
    if anon and not anonymous:
        raise ConfigError(f"{key}.anonymous", "anonymous clients are refused (auth.anonymous: false)")
    for user in users:
        if user != "*" and not accounts.USERNAME.fullmatch(user):
            raise ConfigError(f"{key}.users", f"not a user name: {user!r}")
    if users and not logins:
        raise ConfigError(f"{key}.users", "no htpasswd, tokens_file or tokens_env to log in with")
    upstreams = _strings(f"{key}.upstreams", spec["upstreams"]) if "upstreams" in spec else None
    repositories = _strings(f"{key}.repositories", spec.get("repositories", ["**"]))
    for glob in repositories:
        if not _REPOSITORY_GLOB.fullmatch(glob):
            raise ConfigError(f"{key}.repositories", f"not a repository glob: {glob!r}")
    return AccessRule(
        users=users,
        anonymous=anon,
        upstreams=upstreams,
        repositories=repositories,
        deny=parse_bool(f"{key}.deny", spec.get("deny", False)),
    )


def parse_auth(key: str, value: Any) -> AuthConfig:
    spec = _mapping(key, value, {f.name for f in fields(AuthConfig)} - {"env_tokens"})
    htpasswd = parse_path(f"{key}.htpasswd", spec["htpasswd"]) if spec.get("htpasswd") is not None else None
    tokens_file = (
        parse_path(f"{key}.tokens_file", spec["tokens_file"]) if spec.get("tokens_file") is not None else None
    )
    tokens_env = str(spec["tokens_env"]) if spec.get("tokens_env") is not None else None
    # Read now, so that a bad file stops the start with one line rather than a failed login later.
    if htpasswd is not None:
        _check_accounts(f"{key}.htpasswd", htpasswd, accounts.parse_htpasswd)
    if tokens_file is not None:
        _check_accounts(f"{key}.tokens_file", tokens_file, accounts.parse_tokens)
    env_tokens = ""
    if tokens_env is not None:
        if tokens_env not in os.environ:
            raise ConfigError(f"{key}.tokens_env", f"environment variable {tokens_env} is not set")
        env_tokens = os.environ[tokens_env]
        try:
            accounts.parse_tokens(env_tokens)
        except accounts.AccountsError as exc:
            raise ConfigError(f"{key}.tokens_env", f"{tokens_env}: {exc}") from None
    logins = htpasswd is not None or tokens_file is not None or tokens_env is not None
    anonymous = parse_bool(f"{key}.anonymous", spec.get("anonymous", not logins))
    if not anonymous and not logins:
        raise ConfigError(
            f"{key}.anonymous", "false, but no htpasswd, tokens_file or tokens_env: nobody could pull"
        )
    raw_rules = spec.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{key}.rules", "expected a list")
    rules = tuple(
        parse_rule(f"{key}.rules[{i}]", r, anonymous=anonymous, logins=logins)
        for i, r in enumerate(raw_rules)
    )
    defaults = AuthConfig()
    return AuthConfig(
        htpasswd=htpasswd,
        tokens_file=tokens_file,
        tokens_env=tokens_env,
        env_tokens=env_tokens,
        anonymous=anonymous,
        rules=rules,
        token_ttl=parse_seconds(f"{key}.token_ttl", spec.get("token_ttl", defaults.token_ttl)),
        max_failures=parse_int(
            f"{key}.max_failures", spec.get("max_failures", defaults.max_failures), minimum=1
        ),
        failure_window=parse_seconds(
            f"{key}.failure_window", spec.get("failure_window", defaults.failure_window)
        ),
    )


def _check_accounts(key: str, path: Path, parse: Callable[[str], object]) -> None:
    try:
        parse(_read_text(key, path))
    except accounts.AccountsError as exc:
        raise ConfigError(key, f"{path} {exc}") from None


def check_rule_upstreams(auth: AuthConfig, upstreams: tuple[UpstreamConfig, ...], key: str = "auth") -> None:
    names = [u.name for u in upstreams]
    for i, rule in enumerate(auth.rules):
        for name in rule.upstreams or ():
            if name not in names:
                raise ConfigError(
                    f"{key}.rules[{i}].upstreams",
                    f"unknown upstream {name!r} (configured: {', '.join(names)})",
                )


def parse_tls(key: str, value: Any) -> TlsConfig:
    spec = _mapping(key, value, {"cert", "key", "client_ca"})
    for needed in ("cert", "key"):
        if not spec.get(needed):
            raise ConfigError(f"{key}.{needed}", "required (a PEM file)")
    paths = {
        name: Path(str(spec[name])).expanduser() for name in ("cert", "key", "client_ca") if spec.get(name)
    }
    for name, path in paths.items():
        if not path.is_file():
            raise ConfigError(f"{key}.{name}", f"no such file: {path}")
    return TlsConfig(paths["cert"], paths["key"], paths.get("client_ca"))


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
    "cancel_abandoned_fills": parse_bool,
    "upstream_blob_connections": lambda k, v: parse_int(k, v, minimum=1),
    "verified_ranges_only": parse_bool,
    "log_level": parse_choice(("debug", "info", "warning", "error")),
    "log_format": parse_choice(("json", "console")),
    "docker_config": parse_path,
    "auth": parse_auth,
    "tls": parse_tls,
}
_FIELD_OF: Final = {"max_cache_size": "max_cache_bytes"}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path} is not valid YAML: {exc}") from None
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
    check_rule_upstreams(settings.auth, settings.upstreams)
    return settings


def load(
    config_file: Path | None,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    env = read_env(os.environ if environ is None else environ)
    file_layer = read_yaml(config_file) if config_file is not None else {}
    return build(file_layer, env, flags)
