"""auth: and tls: settings; every mistake is one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.core.authconfig import AccessRule
from proxy.core.config import Settings, load
from proxy.core.configvalues import ConfigError

HASH = "$2y$05$" + "a" * 53
UPSTREAMS = {"docker.io": "https://registry-1.docker.io", "internal": "https://registry.internal"}


def settings_from(tmp_path: Path, doc: dict[str, object], env: dict[str, str] | None = None) -> Settings:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"upstreams": UPSTREAMS, **doc}))
    return load(cfg, {}, env or {})


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(f"ci:{HASH}\n")
    return path


def test_auth_is_off_by_default(tmp_path: Path) -> None:
    s = settings_from(tmp_path, {})
    assert not s.auth.enabled and s.auth.anonymous and s.tls is None


def test_logins_turn_anonymous_off_unless_asked(tmp_path: Path, htpasswd: Path) -> None:
    s = settings_from(tmp_path, {"auth": {"htpasswd": str(htpasswd)}})
    assert s.auth.enabled and s.auth.logins and not s.auth.anonymous
    s = settings_from(tmp_path, {"auth": {"htpasswd": str(htpasswd), "anonymous": True}})
    assert s.auth.anonymous


def test_the_issue_example(tmp_path: Path, htpasswd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI_TOKENS", "ci:" + "t" * 20)
    s = settings_from(
        tmp_path,
        {
            "auth": {
                "htpasswd": str(htpasswd),
                "tokens_env": "CI_TOKENS",
                "anonymous": True,
                "token_ttl": "10m",
                "rules": [
                    {"anonymous": True, "upstreams": ["docker.io"]},
                    {"users": ["ci"], "upstreams": ["internal"], "repositories": ["team/*"]},
                ],
            }
        },
    )
    assert s.auth.rules == (
        AccessRule(anonymous=True, upstreams=("docker.io",)),
        AccessRule(users=("ci",), upstreams=("internal",), repositories=("team/*",)),
    )
    assert s.auth.env_tokens == "ci:" + "t" * 20
    assert "t" * 20 not in repr(s)
    assert s.auth.token_ttl == 600


def test_auth_from_the_environment_as_a_flow_mapping(htpasswd: Path) -> None:
    s = load(None, {}, {"OCICACHE_AUTH": f"{{htpasswd: {htpasswd}}}"})
    assert s.auth.htpasswd == htpasswd


def test_tls(tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    s = settings_from(
        tmp_path,
        {
            "tls": {
                "cert": str(tmp_path / "c.pem"),
                "key": str(tmp_path / "k.pem"),
                "client_ca": str(tmp_path / "ca.pem"),
            }
        },
    )
    assert s.tls is not None and s.tls.client_ca == tmp_path / "ca.pem"


BAD = [
    ({"auth": "nope"}, "auth: expected a mapping"),
    ({"auth": {"htpasswd": "/nonexistent/htpasswd"}}, "auth.htpasswd: cannot read /nonexistent/htpasswd"),
    ({"auth": {"colour": 1}}, "auth: unknown keys: colour"),
    ({"auth": {"anonymous": False}}, "auth.anonymous: false, but no htpasswd"),
    ({"auth": {"tokens_env": "NOT_SET_ANYWHERE"}}, "auth.tokens_env: environment variable NOT_SET_ANYWHERE"),
    ({"auth": {"HT": 1, "rules": {}}}, "auth: unknown keys: HT"),
    ({"auth": {"HTPASSWD": "x"}}, "auth: unknown keys"),
    ({"auth": {"anonymous": "maybe"}}, "auth.anonymous: not a boolean"),
    ({"auth": {"rules": {"users": ["ci"]}}}, "auth.rules: expected a list"),
    ({"auth": {"rules": ["x"]}}, "auth.rules[0]: expected a mapping"),
    ({"auth": {"rules": [{"users": ["ci"]}]}}, "auth.rules[0].users: no htpasswd, tokens_file or tokens_env"),
    ({"auth": {"rules": [{"upstreams": ["docker.io"]}]}}, "auth.rules[0]: give users"),
    (
        {"auth": {"rules": [{"anonymous": True, "upstreams": ["dockerio"]}]}},
        "auth.rules[0].upstreams: unknown upstream 'dockerio'",
    ),
    (
        {"auth": {"rules": [{"anonymous": True, "upstreams": "docker.io"}]}},
        "auth.rules[0].upstreams: expected a non-empty list",
    ),
    (
        {"auth": {"rules": [{"anonymous": True, "repositories": ["Library/*"]}]}},
        "auth.rules[0].repositories: not a repository glob",
    ),
    ({"auth": {"rules": [{"anonymous": False}]}}, "auth.rules[0].anonymous: only anonymous: true"),
    ({"auth": {"rules": [{"anonymous": True, "user": ["ci"]}]}}, "auth.rules[0]: unknown keys: user"),
    ({"tls": {"cert": "/nonexistent/c.pem", "key": "/nonexistent/k.pem"}}, "tls.cert: no such file"),
    ({"tls": {"cert": "/etc/hostname"}}, "tls.key: required"),
    ({"tls": {"key": "/etc/hostname"}}, "tls.cert: required"),
    ({"tls": ["cert"]}, "tls: expected a mapping"),
]


@pytest.mark.parametrize(("doc", "message"), BAD)
def test_mistakes_name_their_key(tmp_path: Path, doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from(tmp_path, doc)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_users_rules_with_anonymous_off(tmp_path: Path, htpasswd: Path) -> None:
    with pytest.raises(ConfigError, match=r"^auth.rules\[1\].anonymous: anonymous clients are refused"):
        settings_from(
            tmp_path,
            {"auth": {"htpasswd": str(htpasswd), "rules": [{"users": ["ci"]}, {"anonymous": True}]}},
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "ci:$apr1$x$y\n",
            "auth.htpasswd: {path} line 1: user 'ci': not a bcrypt hash (make it with htpasswd -B)",
        ),
        ("ci\n", "auth.htpasswd: {path} line 1: expected user:hash"),
    ],
)
def test_bad_htpasswd_stops_the_start(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        settings_from(tmp_path, {"auth": {"htpasswd": str(path)}})
    assert str(info.value) == message.format(path=path)


def test_bad_tokens_stop_the_start_without_showing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tokens"
    path.write_text("ci:tooshort\n")
    with pytest.raises(ConfigError, match=r"^auth.tokens_file: .* line 1: user 'ci': token shorter") as info:
        settings_from(tmp_path, {"auth": {"tokens_file": str(path)}})
    assert "tooshort" not in str(info.value)
    monkeypatch.setenv("CI_TOKENS", "ci:tooshort")
    with pytest.raises(ConfigError, match=r"^auth.tokens_env: CI_TOKENS: line 1") as info:
        settings_from(tmp_path, {"auth": {"tokens_env": "CI_TOKENS"}})
    assert "tooshort" not in str(info.value)


def test_the_examples_commented_auth_and_tls_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "ocicache.example.yaml"
    lines = example.read_text().splitlines()
    blocks: list[str] = []
    for start in ("# auth:", "# tls:"):
        i = next(n for n, line in enumerate(lines) if line.startswith(start))
        while i < len(lines) and lines[i].startswith("#"):
            blocks.append(lines[i].removeprefix("# ").removeprefix("#"))
            i += 1
    text = "\n".join(blocks).replace("/etc/ocicache/", f"{tmp_path}/")
    (tmp_path / "htpasswd").write_text(f"ci:{HASH}\n")
    (tmp_path / "tokens").write_text("robot:" + "r" * 20 + "\n")
    for name in ("tls.crt", "tls.key", "clients-ca.crt"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("OCICACHE_TOKENS", "ops:" + "o" * 20)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    s = load(cfg, {}, {})
    assert s.auth.anonymous and len(s.auth.rules) == 2 and s.auth.max_failures == 10
    assert s.tls is not None and s.tls.client_ca == tmp_path / "clients-ca.crt"
