"""Hostile raw HTTP requests, generated from a seed: the pull API's own requests, mutated.

Each :class:`Case` is the bytes of one connection: one to three requests (pipelined, sent at
once), each built from a method, a target, a version, headers and a body, every part either
valid or drawn from what breaks parsers: odd and oversized methods, dot segments and
percent-encoding, absolute and asterisk forms, header lines without colons or with folding,
huge and digit-bomb values, conflicting ``Transfer-Encoding`` and ``Content-Length``, bodies
on GET, and a layer asked for as a manifest and the other way round. Bodies always match the
framing the request declares (or the request is refused for its framing), so the proxy never
legitimately waits for more bytes: every connection must get an answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Draw = Callable[[random.Random], str]


@dataclass(frozen=True)
class Target:
    """What the fuzz may ask for: repositories, tags and digests the upstream holds."""

    repo: str
    tag: str
    manifests: Sequence[str]  # digests
    blobs: Sequence[str]  # digests
    users: Sequence[tuple[str, str]] = ()  # (user, password) the proxy accepts, if it checks
    tokens: Sequence[str] = ()


@dataclass(frozen=True)
class Case:
    data: bytes
    methods: tuple[str, ...]  # of the requests, in order: HEAD answers have no body
    label: str

    def shown(self) -> str:
        return f"{self.label}: {self.data[:600]!r}" + (" ..." if len(self.data) > 600 else "")


_SEGMENT_JUNK = [
    "..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2f", "%2F", "%00", "%ZZ", "%", "%%", "%u002e", "\\..",
    "..;", ";x", "~", "*", "%c0%ae", "\xff", "é", "\t", " ", "//", "", "A", "LIBRARY", "-x", "x-",
    "a" * 300, "sha256:", "manifests", "blobs", "tags", "list", "v2",
]  # fmt: skip
_METHODS = ["GET"] * 12 + ["HEAD"] * 4 + [
    "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", "Get",
    "BREW", "M-SEARCH", "G\x00T", "GET\t", "X" * 50, "X" * 5000, "", "GET /", "\x16\x03\x01",
]  # fmt: skip
_VERSIONS = ["HTTP/1.1"] * 10 + ["HTTP/1.0"] * 2 + [
    "HTTP/0.9", "HTTP/2.0", "HTTP/1.2", "HTTP/1.10", "http/1.1", "HTTP/1", "HTTP/1.1 x", "", "HTTP/9" * 3,
]  # fmt: skip
_ACCEPT = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json;q=0",
    "*/*", "application/*", "text/html", "*/*;q=0", "application/json;q=nan", "a/b;q=1e999",
    ",,,,", ";", "application/vnd.oci.image.manifest.v1+json;q=" + "9" * 5000,
    ", ".join(f"application/x-{i}+json" for i in range(300)), "\xe9/\xe9", "x" * 7000,
]  # fmt: skip
_RANGES = [
    "bytes=0-0", "bytes=0-10", "bytes=-1", "bytes=5-", "bytes=0-0,2-3", "bytes=0-1,1-2,100-200",
    "bytes=10-5", "bytes=-0", "bytes=0--1", "bytes= 0 - 1 ", "BYTES=0-1", "items=0-1", "bytes=",
    "bytes=1-" + "9" * 5000, "bytes=" + "9" * 5000 + "-", "bytes=-" + "9" * 5000,
    "bytes=" + ",".join(f"{i}-{i}" for i in range(0, 200, 2)), "bytes=٣-٤", "bytes=0-1;x",
    "bytes=" + ",".join(f"{i}-{i + 1}" for i in range(0, 60, 3)), "bytes=0-0,-1", "bytes=99999999-",
]  # fmt: skip
_AUTH = [
    "Basic ", "Basic Og==", "Basic !!!", "Basic " + "QQ==" * 2000, "Bearer ", "Bearer a.b.c",
    "Bearer " + "x" * 5000, "Digest x", "basic Y2k6Y2k=", "Basic dXNlcg==", "Basic \xff\xfe",
    "Bearer \"quoted\"", "Basic YTpi\x00", "Negotiate " + "A" * 100,
]  # fmt: skip
_HOSTS = [
    "127.0.0.1", "cache.example:5000", "[::1]:5000", "", " ", "a b", 'evil"host', "h:99999",
    "x" * 300, "host\x00", "é.example", "h:0", "127.0.0.1:5000, evil", "@evil", "[::1",
]  # fmt: skip
_CONTENT_LENGTH = ["-1", "+5", "5, 6", "9" * 5000, "0x10", " 3", "3 ", "", "1e3", "٣"]
_TRANSFER_ENCODING = ["chunked", "gzip, chunked", "chunked, gzip", "identity", "Chunked", "chunked\x00", "x"]


ASPECTS = ["method", "target", "target", "target", "version", "line", "host", "accept", "range", "range",
           "auth", "headers", "headers", "framing", "framing"]  # fmt: skip


def _pick(rng: random.Random, items: Sequence[str]) -> str:
    return items[rng.randrange(len(items))]


class Generator:
    """Cases from one seed: the same seed gives the same cases."""

    def __init__(self, target: Target, seed: int) -> None:
        self.t = target
        self.rng = random.Random(seed)

    # --- targets --------------------------------------------------------------------------

    def _valid_path(self) -> str:
        rng, t = self.rng, self.t
        name = _pick(rng, [t.repo, t.repo.removeprefix("library/"), f"docker.io/{t.repo}", f"alias/{t.repo}"])
        kind = rng.randrange(10)
        if kind < 3:
            return f"/v2/{name}/manifests/{_pick(rng, [t.tag, *t.manifests])}"
        if kind < 6:
            return f"/v2/{name}/blobs/{_pick(rng, t.blobs)}"
        if kind < 7:
            # The wrong kind: a layer as a manifest, a manifest as a layer.
            return _pick(
                rng,
                [
                    f"/v2/{name}/manifests/{_pick(rng, t.blobs)}",
                    f"/v2/{name}/blobs/{_pick(rng, t.manifests)}",
                ],
            )
        if kind < 8 and rng.random() < 0.25:
            # The referrers API: a manifest's, a blob's, a junk subject, and artifactType filters.
            subject = _pick(rng, [*t.manifests, *t.blobs, "sha256:" + "0" * 64, "latest", "sha256:x"])
            query = _pick(
                rng, ["", "?artifactType=application/x", "?artifactType=", "?artifactType=%00" * 50]
            )
            return f"/v2/{name}/referrers/{subject}{query}"
        if kind < 8:
            query = _pick(
                rng,
                ["", "?n=1", "?n=0", "?n=" + "9" * 5000, "?n=-1", "?n=x", "?last=zzz", "?n=1&last=a",
                 "?n=1&n=2", "?last=%0d%0aX:%20y", "?last=" + "z" * 3000, "?ns=docker.io&ns=ghcr.io",
                 "?n=%C2%B2"],
            )  # fmt: skip
            return f"/v2/{name}/tags/list{query}"
        return _pick(
            rng,
            [
                "/v2/", "/v2", "/", "/healthz", "/metrics", "/setup/docker", "/setup/k3s", "/setup/nope",
                "/setup/containerd?registry=docker.io&override_path=1", "/setup/containerd?registry=x%00",
                "/setup/registries.conf", "/setup/buildkitd.toml", "/auth/token?service=ocicache",
                "/auth/token?scope=repository:x:pull&scope=" + "y" * 3000,
            ],
        )  # fmt: skip

    def _mutated(self, path: str) -> str:
        rng = self.rng
        parts = path.split("/")
        for _ in range(rng.randrange(1, 4)):
            how = rng.randrange(6)
            at = rng.randrange(len(parts))
            if how == 0:
                parts.insert(at, _pick(rng, _SEGMENT_JUNK))
            elif how == 1:
                parts[at] = _pick(rng, _SEGMENT_JUNK)
            elif how == 2:
                parts[at] = "".join(f"%{ord(c):02x}" if rng.random() < 0.5 else c for c in parts[at])
            elif how == 3:
                parts[at] = parts[at].upper()
            elif how == 4:
                parts[at] += _pick(
                    rng, ["?ns=docker.io", "?ns=evil.example", "?ns=", "#frag", "?a=%", "?ns=127.0.0.1:9"]
                )
            else:
                parts[at] = parts[at] * rng.randrange(2, 30)
        mutated = "/".join(parts)
        return _pick(
            rng, [mutated] * 6 + [f"http://evil.example{mutated}", "*", mutated.lstrip("/"), mutated + "\x00"]
        )

    def target(self, hostile: bool) -> str:
        path = self._valid_path()
        return self._mutated(path) if hostile else path

    # --- headers and bodies -----------------------------------------------------------------

    def _credential(self) -> str:
        import base64

        rng, t = self.rng, self.t
        if t.users and rng.random() < 0.4:
            user, password = _pick(rng, [f"{u}\n{p}" for u, p in t.users]).split("\n")
            if rng.random() < 0.5:
                password += "x"
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if t.tokens and rng.random() < 0.3:
            return "Bearer " + _pick(rng, t.tokens)
        return _pick(rng, _AUTH)

    def headers(self, hostile: set[str]) -> tuple[list[str], bytes]:
        rng = self.rng
        lines: list[str] = []
        if "host" not in hostile:
            lines.append("Host: 127.0.0.1")
        elif rng.random() < 0.8:
            lines.append("Host: " + _pick(rng, _HOSTS))
        if "host" in hostile and rng.random() < 0.2:
            lines.append("Host: second.example")
        if rng.random() < 0.6:
            lines.append(
                "Accept: " + (_pick(rng, _ACCEPT) if "accept" in hostile else _ACCEPT[rng.randrange(3)])
            )
        if "range" in hostile or rng.random() < 0.1:
            lines.append("Range: " + _pick(rng, _RANGES if "range" in hostile else _RANGES[:6]))
        if "auth" in hostile or (self.t.users and rng.random() < 0.3):
            lines.append("Authorization: " + self._credential())
        extra = rng.randrange(12) if "headers" in hostile else -1
        if extra == 0:
            lines.append("X-Big: " + "a" * _pick_int(rng, [100, 8000, 8191, 9000, 70000]))
        elif extra == 1:
            lines += [f"X-Many-{i}: v" for i in range(_pick_int(rng, [50, 127, 129, 300]))]
        elif extra == 2:
            lines.append(
                _pick(
                    rng,
                    ["NoColon", ": novalue", "Bad Name: x", "X-Fold: a\r\n b", "X-Nul: a\x00b", "X-\xff: y"],
                )
            )
        elif extra == 3:
            lines.append("Expect: 100-continue")
        elif extra == 4:
            lines += ["Connection: Upgrade", "Upgrade: " + _pick(rng, ["websocket", "h2c", "x" * 100])]
        elif extra == 5:
            lines.append("Connection: " + _pick(rng, ["keep-alive", "close", "close, keep-alive", "x"]))
        elif extra == 6:
            lines.append(
                _pick(
                    rng,
                    [
                        'If-None-Match: "sha256:' + "0" * 64 + '"', "If-None-Match: *", "If-Range: x",
                        "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT", "If-Modified-Since: never",
                        "Accept: */*", "Accept-Encoding: gzip, br", "Cookie: " + "a=b; " * 500,
                        "Content-Type: multipart/form-data; boundary=" + "x" * 200,
                    ],
                )
            )  # fmt: skip
        body = b""
        framing = rng.randrange(4) if "framing" in hostile else -1
        if framing == 0:
            body = rng.randbytes(rng.randrange(1, 2000))
            lines.append(f"Content-Length: {len(body)}")
        elif framing == 1:
            chunks = [rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(1, 4))]
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
            lines.append("Transfer-Encoding: chunked")
        elif framing == 2:
            # Framing the parser must refuse: a conflict, or a value it cannot read.
            lines += _pick_lines(
                rng,
                [
                    ["Transfer-Encoding: chunked", "Content-Length: 5"],
                    ["Content-Length: 5", "Content-Length: 6"],
                    ["Transfer-Encoding: " + _pick(rng, _TRANSFER_ENCODING)],
                    ["Content-Length: " + _pick(rng, _CONTENT_LENGTH)],
                ],
            )
            body = b"hello"
        elif framing == 3:
            lines.append("Transfer-Encoding: chunked")
            body = _pick_bytes(
                rng, [b"zz\r\nx\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n", b"-1\r\n\r\n", b"0\r\n\r\n"]
            )
        return lines, body

    def request(self) -> tuple[bytes, str]:
        rng = self.rng
        # A few aspects of each request are hostile; the rest are what a client sends, so that
        # requests get past the parser and reach routing, the guard and the handlers.
        hostile = set(rng.sample(ASPECTS, rng.choice([0, 1, 1, 1, 2, 2, 3])))
        method = _pick(rng, _METHODS) if "method" in hostile else _pick(rng, ["GET"] * 3 + ["HEAD"])
        version = _pick(rng, _VERSIONS) if "version" in hostile else "HTTP/1.1"
        line = f"{method} {self.target('target' in hostile)} {version}".rstrip(" ")
        if "line" in hostile:
            line = _pick(
                rng, ["", "GET", "GET /v2/", "\r\n", "GET  /v2/  HTTP/1.1", "GET /v2/ HTTP/1.1 extra"]
            )
        lines, body = self.headers(hostile)
        if not line.strip() and not lines:
            # Empty lines before a request are to be ignored (RFC 9112 2.2): with nothing after
            # them there is no request to answer, only an idle connection.
            lines = ["Host: 127.0.0.1"]
        head = "\r\n".join([line, *lines]) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + body, line.partition(" ")[0]

    def case(self, index: int) -> Case:
        roll = self.rng.random()
        # Mostly one request; sometimes a few pipelined; now and then more than aiohttp queues
        # (32) before it stops reading.
        count = 1 if roll < 0.8 else self.rng.randrange(2, 5) if roll < 0.99 else self.rng.randrange(30, 45)
        datas, methods = zip(*(self.request() for _ in range(count)), strict=True)
        return Case(b"".join(datas), tuple(methods), f"case {index}")


def _pick_int(rng: random.Random, items: Sequence[int]) -> int:
    return items[rng.randrange(len(items))]


def _pick_lines(rng: random.Random, items: Sequence[list[str]]) -> list[str]:
    return items[rng.randrange(len(items))]


def _pick_bytes(rng: random.Random, items: Sequence[bytes]) -> bytes:
    return items[rng.randrange(len(items))]
