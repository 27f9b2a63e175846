"""The admin token: from the variable admin_token_env names, or OCICACHE_ADMIN_TOKEN; never
from the file, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.core.config import load
from proxy.core.configvalues import ConfigError

TOKEN = "adm1n-t0ken-0123456789abcdef"


def test_off_without_a_token() -> None:
    assert load(None, {}, {}).admin_token is None


def test_from_ocicache_admin_token() -> None:
    assert load(None, {}, {"OCICACHE_ADMIN_TOKEN": TOKEN}).admin_token == TOKEN


def test_from_the_variable_admin_token_env_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("admin_token_env: MY_ADMIN\n")
    s = load(cfg, {}, {"MY_ADMIN": TOKEN, "OCICACHE_ADMIN_TOKEN": "x" * 20})
    assert s.admin_token == TOKEN
    assert TOKEN not in repr(s)


@pytest.mark.parametrize(
    ("environ", "layer", "message"),
    [
        ({}, {"admin_token_env": "MISSING"}, "MISSING is not set"),
        ({"OCICACHE_ADMIN_TOKEN": "short"}, {}, "16 characters"),
        ({"OCICACHE_ADMIN_TOKEN": "a token with spaces in it"}, {}, "printable ASCII"),
        ({"OCICACHE_ADMIN_TOKEN": "t\u00f6ken-not-ascii-0123456789"}, {}, "printable ASCII"),
        ({}, {"admin_token_env": "not a name"}, "name of an environment variable"),
    ],
)
def test_bad_tokens_are_refused_without_quoting_them(
    tmp_path: Path, environ: dict[str, str], layer: dict[str, str], message: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in layer.items()))
    with pytest.raises(ConfigError) as err:
        load(cfg, {}, environ)
    assert message in str(err.value)
    for value in environ.values():
        assert value not in str(err.value)
