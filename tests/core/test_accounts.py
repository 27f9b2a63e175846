"""htpasswd and token files: what is accepted, what is refused, and the bcrypt check."""

from __future__ import annotations

import subprocess

import bcrypt
import pytest

from proxy.core.accounts import Accounts, AccountsError, parse_htpasswd, parse_tokens


def htpasswd_line(user: str, password: str) -> str:
    """An entry made by the real htpasswd (apache2-utils), as an operator would."""
    out = subprocess.run(
        ["htpasswd", "-nbB", "-C", "5", user, password], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def test_real_htpasswd_entries_check() -> None:
    text = "\n".join([htpasswd_line("ci", "s3cret"), "# a comment", "", htpasswd_line("dev", "other")])
    users = parse_htpasswd(text)
    assert set(users) == {"ci", "dev"}
    accounts = Accounts.build(users, {})
    assert accounts.check_password("ci", "s3cret")
    assert not accounts.check_password("ci", "S3cret")
    assert not accounts.check_password("dev", "s3cret")
    assert not accounts.check_password("nobody", "s3cret")


@pytest.mark.parametrize(
    "password",
    ["x" * 73 + "s3cret", "s3cret\x00", "\udcff", ""],
)
def test_hostile_passwords_are_simply_wrong(password: str) -> None:
    accounts = Accounts.build(parse_htpasswd(htpasswd_line("ci", "s3cret")), {})
    assert not accounts.check_password("ci", password)


def test_no_users_means_no_password_is_right() -> None:
    assert not Accounts.build({}, {}).check_password("ci", "anything")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ci:$apr1$abc$def", "line 1: user 'ci': not a bcrypt hash"),
        ("ci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "not a bcrypt hash"),
        ("ci:plaintext", "not a bcrypt hash"),
        ("no-colon", "line 1: expected user:hash"),
        (":$2y$05$" + "a" * 53, "expected user:hash"),
        ("# ok\nci:$2y$05$" + "a" * 53 + "\nci:$2y$05$" + "b" * 53, "line 3: user 'ci' appears twice"),
    ],
)
def test_bad_htpasswd_entries_are_refused_by_line(text: str, problem: str) -> None:
    with pytest.raises(AccountsError, match=problem.replace("$", r"\$")):
        parse_htpasswd(text)


def test_tokens_by_line_or_comma() -> None:
    tokens = parse_tokens("ci:" + "a" * 20 + "\n# note\ndev:" + "b" * 20 + ", ops:" + "c" * 20)
    assert tokens == {"a" * 20: "ci", "b" * 20: "dev", "c" * 20: "ops"}
    accounts = Accounts.build({}, tokens)
    assert accounts.token_user("b" * 20) == "dev"
    assert accounts.token_user("b" * 19) is None
    assert "a" * 20 not in repr(accounts)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ci:short", "shorter than 16"),
        ("ci:" + "a" * 20 + " b", "a token is letters"),
        ("ci", "expected user:token"),
        ("ci:ocq1." + "a" * 20, "starts the proxy's own tokens"),
        ("ci:" + "a" * 20 + "\ndev:" + "a" * 20, "line 2: a token appears twice"),
    ],
)
def test_bad_tokens_are_refused_by_line_without_the_secret(text: str, problem: str) -> None:
    with pytest.raises(AccountsError, match=problem) as info:
        parse_tokens(text)
    assert "a" * 20 not in str(info.value)


def test_epoch_changes_with_a_users_secrets_only() -> None:
    h1 = bcrypt.hashpw(b"one", bcrypt.gensalt(4))
    h2 = bcrypt.hashpw(b"two", bcrypt.gensalt(4))
    before = Accounts.build({"ci": h1, "dev": h1}, {"t" * 20: "ops"})
    after = Accounts.build({"ci": h2, "dev": h1}, {"t" * 20: "ops"})
    assert before.epoch("ci") != after.epoch("ci")
    assert before.epoch("dev") == after.epoch("dev")
    assert before.epoch("ops") == after.epoch("ops") is not None
    assert before.epoch("nobody") is None
    assert "ops" in before and "nobody" not in before
