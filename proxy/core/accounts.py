"""Pure: who may log in, read from an htpasswd file (bcrypt) and static bearer tokens.

htpasswd lines are ``user:$2y$...`` as ``htpasswd -B`` writes them; other hash kinds (MD5,
SHA-1, crypt) are refused rather than silently never matching. A tokens file (or the value of
``tokens_env``) holds ``user:token`` entries, one per line (commas also separate, for an
environment variable). Tokens are kept only as SHA-256 digests.

Checking a password is a bcrypt computation: tens of milliseconds of CPU by design, so the
caller runs :meth:`Accounts.check_password` in a worker thread and caches what it verified.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import bcrypt

from proxy.core.tokens import PREFIX as ISSUED_PREFIX

# A token is as strong as the person who chose it; refuse short ones instead of hoping.
MIN_TOKEN_LENGTH: Final = 16
_BCRYPT: Final = re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Printable, no colon (it separates user from secret in Basic and in these files), no space.
USERNAME: Final = re.compile(r"[^:\s\x00-\x1f\x7f]{1,256}")


class AccountsError(ValueError):
    """A malformed entry; the message gives the line, never the secret."""


def parse_htpasswd(text: str) -> dict[str, bytes]:
    users: dict[str, bytes] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, digest = line.partition(":")
        if not sep or not USERNAME.fullmatch(user):
            raise AccountsError(f"line {lineno}: expected user:hash")
        if not _BCRYPT.fullmatch(digest.strip()):
            raise AccountsError(f"line {lineno}: user {user!r}: not a bcrypt hash (make it with htpasswd -B)")
        if user in users:
            raise AccountsError(f"line {lineno}: user {user!r} appears twice")
        users[user] = digest.strip().encode()
    return users


def parse_tokens(text: str) -> dict[str, str]:
    """token -> user, from ``user:token`` entries."""
    tokens: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        for entry in line.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("#"):
                continue
            user, sep, token = entry.partition(":")
            if not sep or not USERNAME.fullmatch(user):
                raise AccountsError(f"line {lineno}: expected user:token")
            if not _TOKEN.fullmatch(token):
                raise AccountsError(f"line {lineno}: user {user!r}: a token is letters, digits and -._~+/")
            if token.startswith(ISSUED_PREFIX):
                raise AccountsError(
                    f"line {lineno}: user {user!r}: {ISSUED_PREFIX} starts the proxy's own tokens"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise AccountsError(
                    f"line {lineno}: user {user!r}: token shorter than {MIN_TOKEN_LENGTH} characters"
                )
            if token in tokens:
                raise AccountsError(f"line {lineno}: a token appears twice")
            tokens[token] = user
    return tokens


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class Accounts:
    """One snapshot of the credential files; a reload makes a new one."""

    passwords: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    tokens: Mapping[bytes, str] = field(default_factory=dict, repr=False)  # sha256(token) -> user
    epochs: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, passwords: Mapping[str, bytes], tokens: Mapping[str, str]) -> Accounts:
        hashed = {_digest(token): user for token, user in tokens.items()}
        # A user's epoch changes whenever any of their secrets does, which ends the tokens
        # issued to them before (see tokens.py): a changed password locks out old sessions.
        material: dict[str, list[bytes]] = {}
        for user, digest in passwords.items():
            material.setdefault(user, []).append(b"p" + digest)
        for token_digest, user in sorted(hashed.items()):
            material.setdefault(user, []).append(b"t" + token_digest)
        epochs = {
            user: hashlib.sha256(b"\0".join(parts)).hexdigest()[:16] for user, parts in material.items()
        }
        return cls(dict(passwords), hashed, epochs)

    def __contains__(self, user: object) -> bool:
        return user in self.epochs

    def __len__(self) -> int:
        return len(self.epochs)

    def epoch(self, user: str) -> str | None:
        return self.epochs.get(user)

    def token_user(self, token: str) -> str | None:
        return self.tokens.get(_digest(token))

    def check_password(self, user: str, password: str) -> bool:
        """bcrypt; slow on purpose. An unknown user costs the same as a wrong password, so
        timing does not tell which user names exist."""
        secret = password.encode("utf-8", "surrogateescape")
        known = self.passwords.get(user)
        target = known if known is not None else next(iter(self.passwords.values()), None)
        if target is None:
            return False
        try:
            ok = bcrypt.checkpw(secret, target)
        except ValueError:
            # Over 72 bytes (bcrypt would ignore the rest) or a NUL: never a password we set.
            return False
        return ok and known is not None
