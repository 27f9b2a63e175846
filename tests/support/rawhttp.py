"""HTTP/1.1 over a raw socket, for tests that need byte-level control of what is sent (hostile
requests, pipelining, slow writers) and an exact account of what came back.

The reader takes responses off a stream one at a time: interim 1xx answers are skipped, bodies
are framed by ``Transfer-Encoding: chunked``, ``Content-Length`` or the end of the connection,
and HEAD answers and 204/304 have none. A body cut short raises ``IncompleteReadError``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field

# Our own requests' heads are small, but a response head may carry long headers.
STREAM_LIMIT = 1024 * 1024


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def version(self) -> str:
        return self.raw_head[: self.raw_head.find(b" ")].decode("latin-1")

    @property
    def closes(self) -> bool:
        """Does the server close the connection after this answer?"""
        connection = (self.header("Connection") or "").lower()
        return connection == "close" or (self.version == "HTTP/1.0" and connection != "keep-alive")

    def oci_error_codes(self) -> list[str]:
        """The codes of an OCI error envelope; raises ValueError if the body is not one."""
        doc = json.loads(self.body)
        if not isinstance(doc, dict) or not isinstance(doc.get("errors"), list) or not doc["errors"]:
            raise ValueError("not an OCI error envelope")
        codes = []
        for err in doc["errors"]:
            if not isinstance(err, dict) or not isinstance(err.get("code"), str) or "message" not in err:
                raise ValueError("not an OCI error")
            codes.append(err["code"])
        return codes


async def open_raw(
    port: int, host: str = "127.0.0.1", local: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the proxy on loopback, optionally from another loopback address."""
    return await asyncio.open_connection(
        host, port, limit=STREAM_LIMIT, local_addr=(local, 0) if local is not None else None
    )


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse | None:
    """The next final response on the stream; None at a clean end before any byte of one."""
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        lines = raw[:-4].decode("latin-1").split("\r\n")
        # Only the versions we speak: a server echoing "HTTP/2.0" or "HTTP/0.9" in a text
        # status line is answering in a protocol it does not speak.
        match = re.fullmatch(r"HTTP/1\.[01] ([0-9]{3})(?: (.*))?", lines[0])
        if match is None:
            raise ValueError(f"not a status line: {lines[0]!r}")
        status = int(match.group(1))
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"not a header line: {line!r}")
            headers.append((name.strip(), value.strip()))
        resp = RawResponse(status, match.group(2) or "", headers, b"", raw)
        if 100 <= status < 200:
            continue  # 100 Continue and friends: the answer follows
        break
    if status in (204, 304):
        return resp
    if head:
        # A request the server could not parse is not known to it as HEAD: its error answer
        # has a body. That answer closes the connection, so what follows is that body.
        if resp.closes:
            resp.body = await reader.read()
        return resp
    if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from aiohttp
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        resp.body = b"".join(parts)
    elif resp.header("Content-Length") is not None:
        resp.body = await reader.readexactly(int(resp.header("Content-Length") or 0))
    else:
        resp.body = await reader.read()
    return resp


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def multipart_parts(resp: RawResponse) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a ``multipart/byteranges`` body."""
    ctype = resp.header("Content-Type") or ""
    match = re.search(r"boundary=([A-Za-z0-9'()+_,./:=?-]+)", ctype)
    if match is None:
        raise ValueError(f"no boundary in {ctype!r}")
    delimiter = b"\r\n--" + match.group(1).encode()
    body = resp.body if resp.body.startswith(b"\r\n") else b"\r\n" + resp.body
    chunks = body.split(delimiter)
    if chunks[0] != b"" or chunks[-1] not in (b"--\r\n", b"--"):
        raise ValueError("multipart body not framed by its boundary")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a head")
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode("latin-1").split("\r\n") if line)
        )
        parts.append((fields.get("content-range", ""), data))
    return parts
