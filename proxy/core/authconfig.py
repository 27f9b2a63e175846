"""Pure: the ``auth:`` and ``tls:`` settings (who may pull, and HTTPS on the listener), read and
checked once, with errors that name their key."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from proxy.core import accounts
from proxy.core.configvalues import (
    ConfigError,
    parse_bool,
    parse_int,
    parse_mapping,
    parse_names,
    parse_path,
    parse_seconds,
    read_setting_file,
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


_REPOSITORY_GLOB: Final = re.compile(r"[a-z0-9._/*?-]+")
_RULE_KEYS: Final = {"users", "anonymous", "upstreams", "repositories", "deny"}


def parse_rule(key: str, value: Any, *, anonymous: bool, logins: bool) -> AccessRule:
    spec = parse_mapping(key, value, _RULE_KEYS)
    users = parse_names(f"{key}.users", spec["users"]) if "users" in spec else ()
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
    upstreams = parse_names(f"{key}.upstreams", spec["upstreams"]) if "upstreams" in spec else None
    repositories = parse_names(f"{key}.repositories", spec.get("repositories", ["**"]))
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
    spec = parse_mapping(key, value, {f.name for f in fields(AuthConfig)} - {"env_tokens"})
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
        parse(read_setting_file(key, path))
    except accounts.AccountsError as exc:
        raise ConfigError(key, f"{path} {exc}") from None


def check_rule_upstreams(auth: AuthConfig, names: Sequence[str], key: str = "auth") -> None:
    for i, rule in enumerate(auth.rules):
        for name in rule.upstreams or ():
            if name not in names:
                raise ConfigError(
                    f"{key}.rules[{i}].upstreams",
                    f"unknown upstream {name!r} (configured: {', '.join(names)})",
                )


def parse_tls(key: str, value: Any) -> TlsConfig:
    spec = parse_mapping(key, value, {"cert", "key", "client_ca"})
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
