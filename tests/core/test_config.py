"""Settings: defaults, YAML < env < flags, and errors that name their key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.cli.main import parser
from proxy.core.config import DEFAULT_UPSTREAMS, PARSERS, Settings, load
from proxy.core.configvalues import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "ocicache.example.yaml"


def test_defaults() -> None:
    s = load(None, {}, {})
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 5000)
    assert s.default_upstream.name == "docker.io"
    assert s.default_upstream.url == "https://registry-1.docker.io"
    assert {u.name for u in s.upstreams} >= {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    assert s.tag_ttl == 60
    assert s.cache_dir.name == "ocicache"


def test_example_config_parses_to_the_defaults_it_documents() -> None:
    s = load(EXAMPLE, {}, {})
    d = Settings()
    assert (s.listen_port, s.tag_ttl, s.max_cache_bytes) == (d.listen_port, d.tag_ttl, d.max_cache_bytes)
    assert [u.name for u in s.upstreams] == [u.name for u in DEFAULT_UPSTREAMS]
    assert s.cache_dir == Path("/var/cache/ocicache")


def test_the_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in PARSERS:
        assert re.search(rf"^#? ?{key}:", text, re.M), key


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: 127.0.0.1:7000\ntag_ttl: 5m\nmax_cache_size: 1GiB\nlog_format: console\n")
    env = {"OCICACHE_TAG_TTL": "30", "OCICACHE_LISTEN": "127.0.0.1:7001"}
    s = load(cfg, {"listen": "127.0.0.1:7002"}, env)
    assert s.listen_port == 7002  # flag beats env beats file
    assert s.tag_ttl == 30  # env beats file
    assert s.max_cache_bytes == 1024**3  # file beats default
    assert s.log_format == "console"


def test_upstream_flags_replace_the_list_and_the_first_is_default() -> None:
    ns = parser().parse_args(
        [
            "serve",
            "--upstream",
            "docker.io=http://127.0.0.1:5000",
            "--upstream",
            "ghcr.io=http://127.0.0.1:5001",
        ]
    )
    s = load(None, {"upstreams": ns.upstream}, {})
    assert [(u.name, u.url) for u in s.upstreams] == [
        ("docker.io", "http://127.0.0.1:5000"),
        ("ghcr.io", "http://127.0.0.1:5001"),
    ]


def test_env_upstreams() -> None:
    s = load(None, {}, {"OCICACHE_UPSTREAMS": "quay.io=https://quay.io,myreg.io:5000=http://127.0.0.1:9"})
    assert [u.name for u in s.upstreams] == ["quay.io", "myreg.io:5000"]


def test_password_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "s3cret")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "upstreams:\n  r.io:\n    url: https://r.io\n    username: u\n    password_env: SECRET_FOR_TEST\n"
    )
    up = load(cfg, {}, {}).upstreams[0]
    assert (up.username, up.password) == ("u", "s3cret")
    assert "s3cret" not in repr(up)


@pytest.mark.parametrize(
    ("layer", "key"),
    [
        ({"listen": "nope"}, "listen"),
        ({"tag_ttl": "soon"}, "tag_ttl"),
        ({"max_cache_size": "lots"}, "max_cache_size"),
        ({"upstreams": ["docker.io"]}, "upstreams"),
        ({"upstreams": {"docker.io": "ftp://x"}}, "upstreams.docker.io.url"),
        ({"upstreams": {"Bad Name": "http://x"}}, "upstreams"),
        ({"upstreams": {"a.io": {"url": "http://x", "pasword": "typo"}}}, "upstreams.a.io"),
        ({"log_level": "loud"}, "log_level"),
        ({"no_such_key": 1}, "no_such_key"),
        # Values of the wrong type: each a one-line error naming the key, never a traceback.
        ({"upstreams": 5}, "upstreams"),
        ({"upstreams": {"a.io": {"url": "http://x", "realm_hosts": 5}}}, "upstreams.a.io.realm_hosts"),
        ({"upstreams": {"a.io": {"url": "http://x", "realm_hosts": [5]}}}, "upstreams.a.io.realm_hosts"),
        (
            {"upstreams": {"a.io": {"url": "http://x", "credential_command": 5}}},
            "upstreams.a.io.credential_command",
        ),
        ({"upstreams": {"a.io": {"url": "http://x", "username": ["u"]}}}, "upstreams.a.io.username"),
        ({"upstreams": {"a.io": {"url": 5}}}, "upstreams.a.io.url"),
        (
            {"upstreams": {"a.io": {"url": "http://x", "credential_ttl": "nan"}}},
            "upstreams.a.io.credential_ttl",
        ),
        ({"upstreams": [5]}, "upstreams"),
        ({"tag_ttl": float("nan")}, "tag_ttl"),
        ({"tag_ttl": "nan"}, "tag_ttl"),
        ({"tag_ttl": float("inf")}, "tag_ttl"),
        ({"tag_ttl": "-5"}, "tag_ttl"),
        ({"tag_ttl": True}, "tag_ttl"),
        ({"manifest_timeout": 1e999}, "manifest_timeout"),
        ({"manifest_timeout": 1e300}, "manifest_timeout"),
        ({"blob_retries": 1.9}, "blob_retries"),
        ({"blob_retries": "1.9"}, "blob_retries"),
        ({"blob_retries": True}, "blob_retries"),
        ({"blob_retries": "9" * 5000}, "blob_retries"),
        ({"tags_page_max": 0}, "tags_page_max"),
        ({"max_cache_size": float("inf")}, "max_cache_size"),
        ({"max_cache_size": "9" * 400}, "max_cache_size"),
        ({"max_cache_size": [1]}, "max_cache_size"),
        ({"max_cache_size": 0}, "max_cache_size"),  # people read 0 as unlimited
        ({"max_cache_size": "0GiB"}, "max_cache_size"),
        ({"high_watermark": 0}, "high_watermark"),
        ({"high_watermark": "120%"}, "high_watermark"),
        ({"low_watermark": "95%", "high_watermark": "90%"}, "low_watermark"),
        ({"tag_rules": [{"pattern": "(", "ttl": 5}]}, "tag_rules[0].pattern"),
        ({"tag_rules": [{"pattern": "x", "ttl": "soon"}]}, "tag_rules[0].ttl"),
        ({"tag_rules": [{"pattern": "x"}]}, "tag_rules[0]"),
        ({"tag_rules": "latest"}, "tag_rules"),
        ({"pins": ["nope.example/x:1"]}, "pins[0]"),
        ({"pins": ["docker.io/library/alpine:bad tag"]}, "pins[0]"),
        ({"pins": 5}, "pins"),
        ({"max_unused": "sometime"}, "max_unused"),
        ({"offline": "maybe"}, "offline"),
        (
            {"upstreams": {"a.io": {"url": "http://x", "keep_deleted": "maybe"}}},
            "upstreams.a.io.keep_deleted",
        ),
        ({"upstreams": {"a.io": {"url": "http://x", "tag_ttl": "soon"}}}, "upstreams.a.io.tag_ttl"),
        ({"listen": 5000}, "listen"),
        ({"listen": "h:" + "9" * 5000}, "listen"),
        ({"cache_dir": ["/tmp"]}, "cache_dir"),
        ({"cancel_abandoned_fills": [True]}, "cancel_abandoned_fills"),
        ({"log_level": ["info"]}, "log_level"),
        ({"upstream_blob_connections": 0}, "upstream_blob_connections"),
        ({"referrers_ttl": "soon"}, "referrers_ttl"),
        ({"referrers_max": 0}, "referrers_max"),
        ({"referrers_max": 10**6}, "referrers_max"),
        ({"referrers_api_ttl": "forever"}, "referrers_api_ttl"),
        # Credentials in a URL would be written in clear text wherever the URL is shown.
        ({"upstreams": {"a.io": "http://user:secret@127.0.0.1:5000"}}, "upstreams.a.io.url"),
        ({"upstreams": ["a.io=https://user:secret@r.example"]}, "upstreams.a.io.url"),
        # Found by tests/core/test_properties.py: each was a traceback (ValueError,
        # RecursionError, or a NUL that only failed at the first file operation).
        ({"upstreams": {"a.io": "http://[::1"}}, "upstreams.a.io.url"),
        ({"upstreams": {"a.io": "http://h:99999"}}, "upstreams.a.io.url"),
        ({"cache_dir": "/var/cache/a\x00b"}, "cache_dir"),
        ({"cache_dir": "~no-such-user-ocicache/x"}, "cache_dir"),
        ({"auth": "[" * 1000}, "auth"),
        ({"tls": {"cert": "/x\x00", "key": "/y"}}, "tls.cert"),
    ],
)
def test_errors_name_their_key(layer: dict[str, object], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, layer, {})
    assert info.value.key == key


@pytest.mark.parametrize("text", ["listen: [\n", "listen: " + "[" * 1000, "\udcff"])
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as info:
        load(cfg, {}, {})
    assert info.value.key == "config"


def test_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--listen", "--cache-dir", "--upstream", "--tag-ttl", "--max-cache-size"):
        assert flag in out


def test_a_url_with_credentials_points_at_the_right_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {"upstreams": {"a.io": "https://u:s3cret@r.example"}}, {})
    assert "password_env" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_numbers_from_yaml_and_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tag_ttl: 90\nmanifest_timeout: 2.5\nblob_retries: 5\nmax_cache_size: 1048576\n")
    s = load(cfg, {}, {"OCICACHE_TAGS_PAGE_MAX": "50"})
    assert (s.tag_ttl, s.manifest_timeout, s.blob_retries, s.max_cache_bytes) == (90, 2.5, 5, 1048576)
    assert s.tags_page_max == 50
    assert load(None, {"tag_ttl": "2h"}, {}).tag_ttl == 7200


def test_policy_settings_parse() -> None:
    s = load(
        None,
        {
            "tag_ttl": "forever",
            "tag_rules": [{"pattern": "v[0-9.]+", "ttl": "forever"}, {"pattern": "latest", "ttl": "1m"}],
            "high_watermark": "95%",
            "low_watermark": 0.8,
            "max_unused": "30d",
            "offline": "true",
            "pins": ["alpine", "docker.io/library/busybox:1.36"],
            "upstreams": {"docker.io": {"url": "https://registry-1.docker.io", "tag_ttl": "forever"}},
        },
        {},
    )
    assert s.tag_ttl is None and s.offline and s.max_unused == 30 * 86400
    assert (s.high_watermark, s.low_watermark) == (0.95, 0.8)
    assert [r.ttl for r in s.tag_rules] == [None, 60.0]
    assert s.ttl_for(s.upstreams[0], "latest") == 60.0
    assert s.ttl_for(s.upstreams[0], "edge") is None  # the upstream's own: forever
    assert s.pins == ("alpine", "docker.io/library/busybox:1.36")
    assert load(None, {}, {"OCICACHE_OFFLINE": "1", "OCICACHE_PINS": "alpine,busybox"}).pins == (
        "alpine",
        "busybox",
    )


def test_referrers_settings_and_the_fallback_tags_ttl() -> None:
    s = load(
        None,
        {
            "referrers_ttl": "5m",
            "referrers_max": 10,
            "referrers_api_ttl": "2h",
            "tag_rules": [{"pattern": "sha256-0+", "ttl": 1}],
            "upstreams": {"docker.io": {"url": "https://registry-1.docker.io", "tag_ttl": "forever"}},
        },
        {},
    )
    assert (s.referrers_ttl, s.referrers_max, s.referrers_api_ttl) == (300.0, 10, 7200.0)
    up = s.upstreams[0]
    # A fallback tag follows referrers_ttl, not the upstream's tag TTL; a tag rule still wins.
    assert s.ttl_for(up, "sha256-" + "a" * 64) == 300.0
    assert s.ttl_for(up, "sha512-" + "a" * 64) == 300.0
    assert s.ttl_for(up, "sha256-" + "0" * 64) == 1.0
    # cosign's legacy tags are ordinary tags.
    assert s.ttl_for(up, "sha256-" + "a" * 64 + ".sig") is None
    assert load(None, {"referrers_ttl": "forever"}, {}).referrers_ttl is None
    assert load(None, {}, {"OCICACHE_REFERRERS_MAX": "7"}).referrers_max == 7
