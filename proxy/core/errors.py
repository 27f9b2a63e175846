"""The one table of OCI error codes, each owning its HTTP status, and the envelope writer.

Every error a client can see is an :class:`OciError`. Handlers raise it; one middleware turns
it into the JSON envelope the distribution spec defines::

    {"errors": [{"code": "BLOB_UNKNOWN", "message": "...", "detail": {...}}]}

Nothing else in the package chooses an HTTP status for an error.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Final

from aiohttp import web


class Code(Enum):
    """OCI distribution error codes (spec section "Error Codes"), plus the proxy's own."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    TAG_INVALID = "TAG_INVALID"
    PAGINATION_INVALID = "PAGINATION_NUMBER_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    # Not in the spec: a Range header we cannot satisfy. Clients read the status, not the code.
    RANGE_INVALID = "RANGE_INVALID"
    # Not in the spec: a request that is not valid HTTP, or lacks a required parameter.
    REQUEST_INVALID = "REQUEST_INVALID"
    # Not in the spec: a change refused by what the cache holds (a pinned image, a config pin).
    CONFLICT = "CONFLICT"
    # Not in the spec: a request whose head (or a body we read) did not arrive in time.
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    # Not in the spec: the upstream answered something we cannot use (5xx, garbage, loops).
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    # distribution uses UNAVAILABLE for 503; we use it when the upstream cannot be reached.
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN = "UNKNOWN"


STATUS: Final[dict[Code, int]] = {
    Code.BLOB_UNKNOWN: 404,
    Code.DIGEST_INVALID: 400,
    Code.MANIFEST_UNKNOWN: 404,
    Code.MANIFEST_INVALID: 400,
    Code.NAME_INVALID: 400,
    Code.NAME_UNKNOWN: 404,
    Code.TAG_INVALID: 400,
    Code.PAGINATION_INVALID: 400,
    Code.UNAUTHORIZED: 401,
    Code.DENIED: 403,
    Code.UNSUPPORTED: 405,
    Code.TOOMANYREQUESTS: 429,
    Code.RANGE_INVALID: 416,
    Code.REQUEST_INVALID: 400,
    Code.CONFLICT: 409,
    Code.REQUEST_TIMEOUT: 408,
    Code.UPSTREAM_ERROR: 502,
    Code.UNAVAILABLE: 503,
    Code.UNKNOWN: 500,
}


# For statuses chosen outside our code (aiohttp's router and HTTP parser): the code that owns
# each. A status with no code of its own is a request we could not read (4xx) or our fault.
_CODE_OF_STATUS: Final[dict[int, Code]] = {
    404: Code.NAME_UNKNOWN,
    408: Code.REQUEST_TIMEOUT,
    405: Code.UNSUPPORTED,
    416: Code.RANGE_INVALID,
    429: Code.TOOMANYREQUESTS,
    503: Code.UNAVAILABLE,
}


def code_for_status(status: int) -> Code:
    if status in _CODE_OF_STATUS:
        return _CODE_OF_STATUS[status]
    return Code.REQUEST_INVALID if 400 <= status < 500 else Code.UNKNOWN


class OciError(Exception):
    """An error with an OCI code; its HTTP status comes from :data:`STATUS`, never the raiser."""

    def __init__(
        self,
        code: Code,
        message: str,
        detail: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return STATUS[self.code]


def envelope(code: Code, message: str, detail: Any = None) -> bytes:
    """The spec's error body for one error."""
    return json.dumps({"errors": [{"code": code.value, "message": message, "detail": detail}]}).encode()


def error_response(err: OciError) -> web.Response:
    """The response for ``err``. For HEAD, aiohttp sends these headers and drops the body."""
    headers = {"Content-Type": "application/json; charset=utf-8", **err.headers}
    resp = web.Response(status=err.status, body=envelope(err.code, err.message, err.detail), headers=headers)
    if err.code is Code.REQUEST_TIMEOUT:
        # Part of the request never came: nothing after it on this connection can be read.
        resp.force_close()
    return resp
