"""Why an upstream exchange failed, in words an operator can act on, and who hears of it.

:func:`cause_of` reads a transport exception (aiohttp's, ssl's, the OS's) into a :class:`Cause`:
connection refused or timed out with the errno, a TLS error with its reason, a name that does
not resolve; :func:`status_cause` does the same for an answer (the status, and the OCI error
code of its body). :class:`Health` keeps an upstream's last success and last failure for the
status page; :class:`Observer` is how the web layer counts exchanges and failures into its
metrics without the upstream layer importing it.

A cause holds no URL path or query (signed CDN URLs carry credentials), no header and no body
text beyond an OCI error code, which is cut to the characters codes are made of.
"""

from __future__ import annotations

import asyncio
import errno as errnos
import re
import ssl
import time
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp

from proxy.core import jsontext

# Operations, as labels: what the proxy asked upstream for.
TOKEN: Final = "token"
MANIFEST: Final = "manifest"
BLOB: Final = "blob"
TAGS: Final = "tags"
HEAD: Final = "head"
REFERRERS: Final = "referrers"
OPERATIONS: Final = (TOKEN, MANIFEST, BLOB, TAGS, HEAD, REFERRERS)

_CODE: Final = re.compile(r"[A-Z][A-Z0-9_]{0,39}")
# Statuses that are upstream's answer about the content, not a failure of upstream.
ANSWERS: Final = frozenset({404, 416})


@dataclass(frozen=True, slots=True)
class Cause:
    kind: str  # refused | timeout | tls | dns | unreachable | reset | connection | status | bad_answer
    text: str  # for people: "connection refused (errno 111, ECONNREFUSED)"
    errno: int | None = None
    status: int | None = None
    code: str | None = None  # the OCI error code upstream's body named

    @property
    def label(self) -> str:
        """For the metric: a bounded set of values."""
        return f"http_{self.status}" if self.kind == "status" else self.kind


def _errno_text(number: int | None) -> str:
    if number is None:
        return ""
    name = errnos.errorcode.get(abs(number))
    return f" (errno {number}, {name})" if name and number > 0 else f" (errno {number})"


def _os_errno(exc: BaseException) -> int | None:
    number = getattr(exc, "errno", None)
    return number if isinstance(number, int) else None


def cause_of(exc: BaseException) -> Cause:
    """The cause of a transport failure."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Cause("tls", f"TLS certificate not accepted: {_tls_reason(exc.certificate_error)}")
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        inner = exc.os_error if isinstance(exc, aiohttp.ClientSSLError) else exc
        return Cause("tls", f"TLS handshake failed: {_tls_reason(inner)}")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        number = _os_errno(exc.os_error)
        return Cause("dns", f"host name does not resolve{_errno_text(number)}", number)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _socket_cause(exc.os_error, "connect")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Cause("timeout", "connect timed out")
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return Cause("timeout", "read timed out: upstream sent nothing for too long")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Cause("timeout", "timed out")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Cause("reset", "upstream closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Cause("reset", "the body was cut short")
    if isinstance(exc, OSError):
        return _socket_cause(exc, "connection")
    return Cause("connection", type(exc).__name__)


def _socket_cause(exc: OSError, what: str) -> Cause:
    number = _os_errno(exc)
    suffix = _errno_text(number)
    if number == errnos.ECONNREFUSED:
        return Cause("refused", f"connection refused{suffix}", number)
    if number == errnos.ETIMEDOUT:
        return Cause("timeout", f"{what} timed out{suffix}", number)
    if number in (errnos.EHOSTUNREACH, errnos.ENETUNREACH):
        return Cause("unreachable", f"no route to the host{suffix}", number)
    if number in (errnos.ECONNRESET, errnos.EPIPE, errnos.ECONNABORTED):
        return Cause("reset", f"connection reset{suffix}", number)
    return Cause("connection", f"{what} failed: {type(exc).__name__}{suffix}", number)


def _tls_reason(exc: BaseException) -> str:
    # Not every SSLError has these (one built without a library code has neither).
    verify = getattr(exc, "verify_message", None)
    if isinstance(exc, ssl.SSLCertVerificationError) and verify:
        return str(verify)
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, ssl.SSLError) and exc.args:
        return str(exc.args[-1])[:200]
    return type(exc).__name__


def oci_code(body: bytes) -> str | None:
    """The first error code of an OCI error envelope, if the body is one and the code looks
    like one (upstream's text goes into logs and the status page: nothing else of it does)."""
    try:
        doc = jsontext.loads(body)
        code = doc["errors"][0]["code"]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    return code if isinstance(code, str) and _CODE.fullmatch(code) else None


def status_cause(status: int, body: bytes = b"") -> Cause:
    code = oci_code(body)
    text = f"HTTP {status}" + (f" {code}" if code else "")
    return Cause("status", text, status=status, code=code)


def bad_answer(message: str) -> Cause:
    return Cause("bad_answer", message)


@dataclass(frozen=True, slots=True)
class Failure:
    at: float  # wall-clock time
    operation: str
    host: str
    cause: Cause


class Health:
    """An upstream's last success and last failure (for people; the metrics count them all)."""

    __slots__ = ("last_failure", "last_success")

    def __init__(self) -> None:
        self.last_success: float | None = None
        self.last_failure: Failure | None = None

    def succeeded(self) -> None:
        self.last_success = time.time()

    def failed(self, operation: str, host: str, cause: Cause) -> Failure:
        self.last_failure = Failure(time.time(), operation, host, cause)
        return self.last_failure


class Observer(Protocol):
    """What the app counts (web/metrics implements it); the upstream layer only calls it."""

    def exchanged(self, upstream: str, operation: str, seconds: float) -> None: ...

    def failed(self, upstream: str, operation: str, cause: Cause) -> None: ...

    def received(self, upstream: str, operation: str, size: int) -> None: ...


class NoObserver:
    def exchanged(self, upstream: str, operation: str, seconds: float) -> None:
        pass

    def failed(self, upstream: str, operation: str, cause: Cause) -> None:
        pass

    def received(self, upstream: str, operation: str, size: int) -> None:
        pass
