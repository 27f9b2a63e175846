"""The command line's way to act through a running proxy: its admin API (``--proxy URL``).

The token is the one ``serve`` reads (``admin_token_env`` or ``OCICACHE_ADMIN_TOKEN``), taken
from the same settings; it travels only in the Authorization header, never in a message.
Plain blocking HTTP (urllib): one request at a time, as a command line does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

from proxy.core import jsontext

PREFIX: Final = "/admin/v1"
TIMEOUT: Final = 120.0


class RemoteError(Exception):
    """The proxy refused or failed a request; the message says why, for people."""


def quoted(reference: str) -> str:
    """A reference as a path tail: its slashes, colon and @ kept, anything else escaped."""
    return urllib.parse.quote(reference, safe="/:@")


class Admin:
    def __init__(self, url: str, token: str | None) -> None:
        if token is None:
            raise RemoteError("--proxy needs the admin token: set OCICACHE_ADMIN_TOKEN (or admin_token_env)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RemoteError(f"--proxy expects http(s)://HOST:PORT, got {url!r}")
        self.base = url.rstrip("/")
        self._token = token

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = TIMEOUT) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + PREFIX + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self._token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                answer = resp.read() or b"null"
        except urllib.error.HTTPError as err:
            raise RemoteError(f"{self.base}: {err.code} {_message(err.read())}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RemoteError(f"cannot reach {self.base}: {reason}") from None
        try:
            return jsontext.loads(answer)
        except ValueError:
            raise RemoteError(f"{self.base}: the answer is not JSON (is it an ocicache?)") from None


def _message(body: bytes) -> str:
    try:
        first = jsontext.loads(body)["errors"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return body[:200].decode(errors="replace")
    detail = first.get("detail")
    return f"{first.get('code')}: {first.get('message')}" + (f" {json.dumps(detail)}" if detail else "")
