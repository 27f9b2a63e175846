"""An in-process fake upstream registry whose misbehaviour tests can script.

A real registry cannot be told to drop the connection after N bytes, stall
until a test says go, or answer 429 on demand; this fake can.  It speaks the
pull side of the OCI Distribution API on 127.0.0.1 ephemeral ports and keeps
a log of every request (`seen`) so tests can assert how often the proxy went
upstream.  Optional extra origins mimic Docker Hub: a Bearer token server and
a "CDN" that blob GETs are 307-redirected to with signed URLs.

It also speaks the OCI 1.1 referrers API over the manifests it holds (those whose
``subject`` names a digest), with paging and artifactType filtering that tests can
switch off, or not at all (``referrers_mode``: 404 like distribution, 405, or a
303 to a 404 like ghcr.io), in which case tests push the fallback tag instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

from aiohttp import encode_basic_auth, web
from aiohttp.typedefs import Handler, Middleware

from tests.support.images import Image

Origin = Literal["registry", "token", "cdn"]
ReferrersMode = Literal["api", "404", "405", "redirect-404"]
ReferrersHook = Callable[[web.Request, str, str], web.StreamResponse | None]
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SERVICE = "fake-registry"
CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Seen:
    origin: Origin
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # keys lower-cased, so lookups need not guess case


@dataclass
class BlobFaults:
    """Misbehaviour for one digest (blob or manifest), applied to GET bodies.

    All offsets are positions in the blob, not in one response, so faults sit
    at a fixed spot like bad upstream storage would: a Range response covering
    the offset meets the fault there, one starting past it does not.  A resume
    from exactly reset_at is thus reset at once while reset_times lasts.
    The client receives exactly the bytes before a reset/stall point.
    """

    throttle_bps: int | None = None
    reset_at: int | None = None
    reset_times: int = 1
    stall_at: int | None = None
    release: asyncio.Event | None = None
    corrupt_at: int | None = None
    # Set by the fake once a response has flushed stall_at bytes and is waiting,
    # so tests synchronise on an event rather than on time.
    stalled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.stall_at is not None and self.release is None:
            self.release = asyncio.Event()

    def resume(self) -> None:
        """Let a stalled body go on."""
        assert self.release is not None, "these faults have no stall"
        self.release.set()


@dataclass
class _Blob:
    data: bytes
    repos: set[str] | None  # None: any repository may serve it


def tags_key(name: str) -> str:
    """The key of ``FakeUpstream.faults`` for the tags list of ``name``."""
    return f"tags {name}"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status, headers=headers)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) for a single-range header (empty if unsatisfiable), or None
    to send everything: malformed and multi-range headers may be ignored (RFC 9110).
    """
    m = _RANGE_RE.fullmatch(header.strip()) if header else None
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: the final N bytes
        return (max(0, size - int(last)), size) if int(last) else (size, size)
    if last != "" and int(last) < int(first):
        return None
    return min(int(first), size), size if last == "" else min(size, int(last) + 1)


class FakeUpstream:
    def __init__(
        self,
        *,
        auth: Literal["none", "bearer", "basic"] = "none",
        credentials: tuple[str, str] | None = None,
        cdn: bool = False,
        token_ttl: int = 300,
    ) -> None:
        if auth == "basic" and credentials is None:
            raise ValueError("auth='basic' needs credentials")
        self.auth = auth
        self.credentials = credentials
        # Encoded once: also rejects a login containing ":" up front.
        self._basic_value = encode_basic_auth(*credentials)[len("Basic ") :] if credentials else None
        self.cdn = cdn
        self.token_ttl = token_ttl
        self.url = ""
        self.token_url = ""
        self.cdn_url = ""
        self.seen: list[Seen] = []
        # Called with every request as it arrives: tests that act at the n-th request.
        self.observers: list[Callable[[Seen], None]] = []
        self.faults: dict[str, BlobFaults] = {}
        self.rate_limit_next = 0
        # Answer every blob request with the whole blob, as some registries and CDNs do.
        self.ignore_ranges = False
        # Body bytes sent per digest (blob, manifest or tags key): what upstream paid.
        self.sent_bytes: dict[str, int] = {}
        self.retry_after = 7
        self.ratelimit_remaining: int | None = None
        self.private_repos: set[str] = set()
        # The referrers API: "api", or how a registry without one answers.
        self.referrers_mode: ReferrersMode = "api"
        # Descriptors per referrers page (None: all in one), and whether ?artifactType= is
        # applied (and OCI-Filters-Applied sent) or ignored, as the spec allows.
        self.referrers_page: int | None = None
        self.referrers_filter = True
        # Sees each referrers request (request, name, subject) first; a response it returns
        # is sent instead of the fake's own (hostile answers).
        self.referrers_hook: ReferrersHook | None = None
        self._blobs: dict[str, _Blob] = {}
        self._manifests: dict[tuple[str, str], tuple[bytes, str]] = {}  # (repo, digest) -> (body, type)
        self._tags: dict[str, dict[str, str]] = {}  # repo -> tag -> digest
        self._tokens: dict[str, tuple[frozenset[str], float]] = {}  # -> (repos, expiry)
        self._sigs: dict[str, str] = {}  # CDN signature -> the digest it was issued for
        self._runners: list[web.AppRunner] = []
        self._closing = asyncio.Event()
        self._streaming: set[asyncio.Transport] = set()  # connections with a body in flight

    def add_blob(self, data: bytes, *, repos: Iterable[str] | None = None) -> str:
        digest = digest_of(data)
        old = self._blobs.get(digest)
        # Adding the same bytes again widens where they may be served.
        allowed: set[str] | None = None
        if repos is not None and (old is None or old.repos is not None):
            allowed = set(repos) | (old.repos if old is not None and old.repos else set())
        self._blobs[digest] = _Blob(data, allowed)
        return digest

    def add_manifest(self, name: str, body: bytes, media_type: str, tag: str | None = None) -> str:
        digest = digest_of(body)
        self._manifests[(name, digest)] = (body, media_type)
        tags = self._tags.setdefault(name, {})
        if tag is not None:
            tags[tag] = digest
        return digest

    def delete_tag(self, name: str, tag: str) -> None:
        """Upstream forgets a tag (the manifest stays reachable by digest)."""
        self._tags.get(name, {}).pop(tag, None)

    def add_image(self, name: str, image: Image, tag: str | None = None) -> str:
        """An image's blobs, and its manifest under ``name`` (and ``tag``); its digest."""
        for blob in image.blobs:
            self.add_blob(blob.data)
        return self.add_manifest(name, image.manifest, image.media_type, tag=tag)

    def count(
        self,
        *,
        origin: str | None = None,
        method: str | None = None,
        path_contains: str = "",
        with_range: bool | None = None,
    ) -> int:
        return sum(
            1
            for s in self.seen
            if (origin is None or s.origin == origin)
            and (method is None or s.method == method.upper())
            and path_contains in s.path
            and (with_range is None or ("range" in s.headers) == with_range)
        )

    def expire_tokens(self) -> None:
        """Forget every issued token, forcing clients through the 401 path again."""
        self._tokens.clear()

    def expire_signatures(self) -> None:
        """Make every CDN URL handed out so far answer 403, like an expired signed URL."""
        self._sigs.clear()

    async def start(self) -> None:
        registry = web.Application(middlewares=[self._recorder("registry")])
        registry.router.add_get("/v2/{rest:.*}", self._v2)
        registry.on_response_prepare.append(self._registry_headers)
        self.url = await self._serve(registry)
        if self.auth == "bearer":
            tokens = web.Application(middlewares=[self._recorder("token")])
            tokens.router.add_get("/token", self._token)
            self.token_url = await self._serve(tokens)
        if self.cdn:
            cdn = web.Application(middlewares=[self._recorder("cdn")])
            cdn.router.add_get("/blobs/{digest}", self._cdn_blob)
            self.cdn_url = await self._serve(cdn)

    async def _serve(self, app: web.Application) -> str:
        # A short shutdown_timeout is only a backstop: close() ends streaming
        # bodies itself, so it normally finds no handler still running.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)  # loopback only, ephemeral port
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        # Wake stalled bodies and cut the rest, else aiohttp's shutdown would wait
        # (up to shutdown_timeout) for bodies nobody may ever read.
        self._closing.set()
        for transport in list(self._streaming):
            transport.abort()
        while self._runners:
            await self._runners.pop().cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _recorder(self, origin: Origin) -> Middleware:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            # Recorded on arrival, so a stalled request is already visible.
            headers = {k.lower(): v for k, v in request.headers.items()}
            seen = Seen(origin, request.method, request.path, dict(request.query), headers)
            self.seen.append(seen)
            for observe in self.observers:
                observe(seen)
            if origin == "registry" and self.rate_limit_next > 0 and request.path.startswith("/v2/"):
                self.rate_limit_next -= 1  # after recording: 429s count as requests too
                return _error(429, "TOOMANYREQUESTS", "rate limited", {"Retry-After": str(self.retry_after)})
            return await handler(request)

        return record

    async def _registry_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Docker-Distribution-API-Version"] = "registry/2.0"
        if self.ratelimit_remaining is not None:
            response.headers["ratelimit-limit"] = "100;w=21600"
            response.headers["ratelimit-remaining"] = f"{self.ratelimit_remaining};w=21600"

    def _basic_ok(self, request: web.Request) -> bool | None:
        """None without Basic credentials, else whether they match ours."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        # base64 of "user:password" is canonical, so comparing encodings suffices.
        return value.strip() == self._basic_value

    def _deny(self, request: web.Request, name: str | None) -> web.Response | None:
        """The 401 to send for this request, or None when it may proceed."""
        if self.auth == "basic":
            if self._basic_ok(request):
                return None
            challenge = 'Basic realm="fake"'
            return _error(401, "UNAUTHORIZED", "credentials required", {"WWW-Authenticate": challenge})
        if self.auth == "none":
            return None
        header = request.headers.get("Authorization", "")
        repos, expiry = self._tokens.get(header.removeprefix("Bearer "), (frozenset(), 0.0))
        live = header.startswith("Bearer ") and expiry > time.monotonic()
        if live and (name is None or name in repos):
            return None
        challenge = f'Bearer realm="{self.token_url}/token",service="{SERVICE}"'
        if name is not None:
            challenge += f',scope="repository:{name}:pull"'
            if live:  # a good token, just not for this repository
                challenge += ',error="insufficient_scope"'
        return _error(401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge})

    async def _token(self, request: web.Request) -> web.Response:
        if request.query.get("service") != SERVICE:
            return web.json_response({"details": "unknown service"}, status=400)
        basic = self._basic_ok(request)
        if basic is False:
            return web.json_response({"details": "incorrect username or password"}, status=401)
        repos: set[str] = set()
        # Clients may repeat `scope` or pack several into one, space-separated.
        for scope in " ".join(request.query.getall("scope", [])).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or "pull" not in actions.split(","):
                continue
            if name in self.private_repos and not basic:
                return web.json_response({"details": f"{name}: credentials required"}, status=401)
            repos.add(name)
        value = secrets.token_urlsafe(24)
        self._tokens[value] = (frozenset(repos), time.monotonic() + self.token_ttl)
        issued = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {"token": value, "access_token": value, "expires_in": self.token_ttl, "issued_at": issued}
        return web.json_response(body)

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        rest = request.match_info["rest"]
        if not rest:  # the API version check
            # Explicit None test: a Response is a (usually empty) mapping, so falsy.
            denied = self._deny(request, None)
            return web.json_response({}) if denied is None else denied
        if rest.endswith("/tags/list"):
            name, kind, ref = rest[: -len("/tags/list")], "tags", ""
        else:
            # Names may contain slashes and even the words "blobs"/"manifests";
            # the last marker wins because references never contain "/".
            cut = max(rest.rfind("/manifests/"), rest.rfind("/blobs/"), rest.rfind("/referrers/"))
            if cut <= 0:
                return _error(404, "NAME_UNKNOWN", "no such route")
            name = rest[:cut]
            kind, _, ref = rest[cut + 1 :].partition("/")
            if not ref or "/" in ref:
                return _error(404, "NAME_UNKNOWN", "no such route")
        denied = self._deny(request, name)
        if denied is not None:
            return denied
        if kind == "tags":
            return await self._tags_list(request, name)
        if kind == "manifests":
            return await self._manifest(request, name, ref)
        if kind == "referrers":
            return await self._referrers(request, name, ref)
        return await self._registry_blob(request, name, ref)

    async def _manifest(self, request: web.Request, name: str, ref: str) -> web.StreamResponse:
        digest = ref if ref.startswith("sha256:") else self._tags.get(name, {}).get(ref, "")
        found = self._manifests.get((name, digest))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", f"manifest unknown: {name}:{ref}")
        body, media_type = found
        return await self._send(request, body, digest, media_type, ranged=False)

    def referrers_of(self, name: str, subject: str) -> list[dict[str, object]]:
        """Descriptors of the manifests of ``name`` whose subject is ``subject``, as the spec
        lists them (artifactType, else the config's media type; the annotations)."""
        found: list[dict[str, object]] = []
        for (repo, digest), (body, media_type) in self._manifests.items():
            if repo != name:
                continue
            try:
                doc = json.loads(body)
            except ValueError:
                continue
            if not isinstance(doc, dict) or (doc.get("subject") or {}).get("digest") != subject:
                continue
            entry: dict[str, object] = {"mediaType": media_type, "digest": digest, "size": len(body)}
            artifact = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if artifact:
                entry["artifactType"] = artifact
            if doc.get("annotations"):
                entry["annotations"] = doc["annotations"]
            found.append(entry)
        return found

    async def _referrers(self, request: web.Request, name: str, subject: str) -> web.StreamResponse:
        if self.referrers_hook is not None:
            scripted = self.referrers_hook(request, name, subject)
            if scripted is not None:
                return scripted
        if self.referrers_mode == "404":
            return web.Response(status=404, text="404 page not found\n")  # distribution's router
        if self.referrers_mode == "405":
            return _error(405, "UNSUPPORTED", "the operation is unsupported")
        if self.referrers_mode == "redirect-404":
            raise web.HTTPSeeOther(f"/no-referrers-here/{subject}")
        entries = self.referrers_of(name, subject)
        headers: dict[str, str] = {}
        artifact = request.query.get("artifactType")
        if artifact is not None and self.referrers_filter:
            entries = [e for e in entries if e.get("artifactType") == artifact]
            headers["OCI-Filters-Applied"] = "artifactType"
        if self.referrers_page is not None:
            last = request.query.get("last")
            digests = [e["digest"] for e in entries]
            start = digests.index(last) + 1 if last in digests else 0
            page = entries[start : start + self.referrers_page]
            if start + self.referrers_page < len(entries):
                query = f"last={page[-1]['digest']}"
                if artifact is not None:
                    query += f"&artifactType={quote(artifact, safe='')}"
                headers["Link"] = f'</v2/{name}/referrers/{subject}?{query}>; rel="next"'
            entries = page
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        return await self._send(request, body, f"referrers {subject}", OCI_INDEX, ranged=False, extra=headers)

    async def _registry_blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        blob = self._blobs.get(digest)
        if blob is None or (blob.repos is not None and name not in blob.repos):
            return _error(404, "BLOB_UNKNOWN", f"blob unknown to {name}: {digest}")
        if self.cdn and request.method == "GET":
            sig = secrets.token_urlsafe(16)
            self._sigs[sig] = digest
            raise web.HTTPTemporaryRedirect(f"{self.cdn_url}/blobs/{digest}?sig={sig}")
        return await self._send(request, blob.data, digest, "application/octet-stream", ranged=True)

    async def _tags_list(self, request: web.Request, name: str) -> web.StreamResponse:
        """The tags of ``name``; streamed like a blob, so ``faults[tags_key(name)]`` applies."""
        if name not in self._tags:
            return _error(404, "NAME_UNKNOWN", f"repository unknown: {name}")
        tags = sorted(self._tags[name])
        last = request.query.get("last")
        tags = [t for t in tags if t > last] if last else tags
        headers: dict[str, str] = {}
        if "n" in request.query:
            try:
                n = int(request.query["n"])
            except ValueError:
                return _error(400, "PAGINATION_NUMBER_INVALID", "n must be an integer")
            if n < len(tags) and n > 0:
                headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[n - 1]}>; rel="next"'
            tags = tags[: max(n, 0)]
        body = json.dumps({"name": name, "tags": tags}).encode()
        return await self._send(
            request, body, tags_key(name), "application/json", ranged=False, extra=headers
        )

    async def _cdn_blob(self, request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers:
            # S3 and friends refuse a second auth mechanism on a signed URL.
            return web.Response(status=400, text="InvalidArgument: only one auth mechanism allowed")
        digest = request.match_info["digest"]
        blob = self._blobs.get(digest)
        if blob is None or self._sigs.get(request.query.get("sig", "")) != digest:
            return web.Response(status=403, text="AccessDenied: signature invalid or expired")
        return await self._send(request, blob.data, digest, "application/octet-stream", ranged=True)

    async def _send(
        self,
        request: web.Request,
        data: bytes,
        digest: str,
        media_type: str,
        *,
        ranged: bool,
        extra: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        headers = {"Content-Type": media_type, **(extra or {})}
        if digest.startswith("sha256:"):
            headers |= {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'}
        start, stop, status = 0, len(data), 200
        if ranged and not self.ignore_ranges:
            headers["Accept-Ranges"] = "bytes"
            span = _byte_range(request.headers.get("Range"), len(data))
            if span is not None and span[0] >= span[1]:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            if span is not None:
                (start, stop), status = span, 206
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = stop - start
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        transport = request.transport
        if transport is None:  # the client is already gone
            return resp
        self._streaming.add(transport)
        try:
            await self._stream(
                request, resp, data, start, stop, self.faults.get(digest) or BlobFaults(), digest
            )
        except ConnectionError:
            pass  # the client hung up mid-body (or close() cut it); not a failure of the fake
        finally:
            self._streaming.discard(transport)
        return resp

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        data: bytes,
        start: int,
        stop: int,
        f: BlobFaults,
        digest_key: str,
    ) -> None:
        body = data[start:stop]
        if f.corrupt_at is not None and start <= f.corrupt_at < stop:
            flipped = bytearray(body)
            flipped[f.corrupt_at - start] ^= 0xFF
            body = bytes(flipped)
        # Fault points as offsets into this response's body, None if not covered.
        reset_at = stall_at = None
        if f.reset_at is not None and f.reset_times > 0 and start <= f.reset_at < stop:
            f.reset_times -= 1  # claimed up front so concurrent responses cannot both use it
            reset_at = f.reset_at - start
        if f.stall_at is not None and start <= f.stall_at < stop:
            stall_at = f.stall_at - start
        step = CHUNK if f.throttle_bps is None else max(1, min(CHUNK, f.throttle_bps // 20))
        sent = 0
        while True:
            if sent == reset_at:
                await self._abort(request)
                return
            if sent == stall_at:
                await self._flush(request)
                f.stalled.set()
                assert f.release is not None  # __post_init__ provides one
                if not await self._released(f.release):
                    return  # close() has already cut the connection
                stall_at = None
            if sent >= len(body):
                break
            marks = [m for m in (reset_at, stall_at) if m is not None and m > sent]
            end = min(len(body), sent + step, *marks)
            await resp.write(body[sent:end])
            self.sent_bytes[digest_key] = self.sent_bytes.get(digest_key, 0) + (end - sent)
            if f.throttle_bps is not None:
                await asyncio.sleep((end - sent) / f.throttle_bps)  # fake throttle
            sent = end
        await resp.write_eof()

    @staticmethod
    async def _flush(request: web.Request) -> None:
        # aiohttp only drains every 64 KiB; with a zero high-water mark drain()
        # waits until asyncio's buffer is empty, i.e. the bytes are in the
        # kernel, so a reset/stall really happens after exactly N bytes.
        transport = request.transport
        if transport is None:
            return
        transport.set_write_buffer_limits(high=0)
        await request.writer.drain()
        transport.set_write_buffer_limits()  # back to the defaults for the rest of the body

    async def _abort(self, request: web.Request) -> None:
        await self._flush(request)
        if request.transport is not None:
            # Dropped mid-body, the client gets fewer bytes than Content-Length,
            # i.e. a payload error.  Deliberately no SO_LINGER=0 RST: that would
            # discard bytes still in flight and make reset_at inexact.
            request.transport.abort()

    async def _released(self, release: asyncio.Event) -> bool:
        """Wait for release or for close(); True if released."""
        if release.is_set():
            return True
        waiters = [asyncio.ensure_future(release.wait()), asyncio.ensure_future(self._closing.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        return not self._closing.is_set()
