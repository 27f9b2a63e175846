"""The credential files (``auth.htpasswd``, ``auth.tokens_file``) on disk, reread when they change.

Blocking: every method stats or reads files, so callers run them in a worker thread. Whether a
file changed is decided by its inode, size, mtime and ctime, so an editor's atomic rename and an
in-place rewrite are both noticed. A file that turns unreadable or malformed while the proxy
runs is logged and the last good accounts stay in force: a half-written file must not lock
everybody out, nor let anybody in.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from proxy.core import accounts
from proxy.core.accounts import Accounts
from proxy.core.authconfig import AuthConfig
from proxy.core.configvalues import ConfigError

log = structlog.get_logger("ocicache.auth")

_Stamp = tuple[int, int, int, int] | None
T = TypeVar("T")


def _stamp(path: Path | None) -> _Stamp:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class AccountFiles:
    def __init__(self, auth: AuthConfig) -> None:
        self._htpasswd = auth.htpasswd
        self._tokens_file = auth.tokens_file
        self._env_tokens = auth.env_tokens
        self._stamps: tuple[_Stamp, _Stamp] = (None, None)
        self._lock = threading.Lock()  # two worker threads may look at once

    def load(self) -> Accounts:
        """The accounts as the files say now; ConfigError (naming the key) if they are bad."""
        with self._lock:
            stamps = (_stamp(self._htpasswd), _stamp(self._tokens_file))
            result = self._read()
            self._stamps = stamps
            return result

    def reload_if_changed(self) -> Accounts | None:
        """New accounts if a file changed since the last look and still reads well; else None."""
        with self._lock:
            stamps = (_stamp(self._htpasswd), _stamp(self._tokens_file))
            if stamps == self._stamps:
                return None
            # Remembered even if the read fails, so a bad file is reported once, not per request.
            self._stamps = stamps
            try:
                result = self._read()
            except ConfigError as exc:
                log.error("accounts_reload_failed", error=str(exc), kept="previous accounts")
                return None
        log.info("accounts_reloaded", users=len(result))
        return result

    def _read(self) -> Accounts:
        passwords: dict[str, bytes] = {}
        tokens: dict[str, str] = {}
        if self._htpasswd is not None:
            passwords = _parse("auth.htpasswd", self._htpasswd, accounts.parse_htpasswd)
        if self._tokens_file is not None:
            tokens.update(_parse("auth.tokens_file", self._tokens_file, accounts.parse_tokens))
        if self._env_tokens:
            tokens.update(accounts.parse_tokens(self._env_tokens))  # checked with the settings
        return Accounts.build(passwords, tokens)


def _parse(key: str, path: Path, parse: Callable[[str], T]) -> T:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    try:
        return parse(text)
    except accounts.AccountsError as exc:
        raise ConfigError(key, f"{path} {exc}") from None
