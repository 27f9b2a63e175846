"""The only module that talks to registries.

It owns tokens, redirects and timeouts, and translates every third-party exception once, here:

    OciError                       what a client may see; .code decides the HTTP status
    ├── code UNAVAILABLE (503)     upstream unreachable, timed out, or the connection broke
    ├── code UPSTREAM_ERROR (502)  upstream answered 5xx, garbage, a forbidden redirect, a loop
    ├── code TOOMANYREQUESTS (429) upstream rate limit, with its Retry-After
    └── code DENIED / *_UNKNOWN    upstream's final word on this request

``UNAVAILABLE`` and ``UPSTREAM_ERROR`` are :func:`retryable`; the rest are answers.

Every failure (all but 404 and 416, which are answers about content) is logged once, at
warning, as ``upstream_failed`` with the upstream's name, the host, the operation and the cause
(:mod:`proxy.upstream.failures`), counted through the client's ``observer``, and kept as the
upstream's last failure for the status page. Exchanges are timed the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
import structlog
from cachetools import LRUCache
from yarl import URL

from proxy.core import jsontext
from proxy.core.config import Settings, UpstreamConfig
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.core.links import next_target
from proxy.core.mediatypes import MANIFEST_MAX, MANIFEST_TYPES, OCI_INDEX
from proxy.core.reference import Digest
from proxy.core.referrers import PAGE_MAX, Descriptor, NotAnIndex, filters_applied, parse_index
from proxy.core.upstreamauth import (
    Challenge,
    Token,
    basic_header,
    parse_challenge,
    parse_token_response,
    peer_url,
    pull_scope,
    realm_allowed,
    redirect_allowed,
    same_origin,
    token_request_url,
)
from proxy.upstream import failures
from proxy.upstream.credentials import run_helper
from proxy.upstream.failures import ANSWERS, Cause, Health, NoObserver, Observer
from proxy.upstream.slots import Slots

log = structlog.get_logger("ocicache.upstream")

# A tags page is at most tags_page_max names of up to 128 characters: far below this.
TAGS_MAX: Final = 4 * 1024 * 1024
# Token answers are small JSON documents (a JWT or two); anything larger is not one.
TOKEN_MAX: Final = 1024 * 1024
MAX_REDIRECTS: Final = 5
# Pages of one referrers answer we follow at most (each must bring new descriptors, too).
REFERRERS_PAGES_MAX: Final = 64
# Upstream's query for its next page goes back to it, but not an unbounded one.
_LINK_QUERY_MAX: Final = 2048
# Statuses that mean "no referrers API here" (spec: a registry with it never answers 404).
_NO_REFERRERS_API: Final = frozenset({404, 405})
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_TRANSPORT_ERRORS: Final = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def retryable(err: OciError) -> bool:
    return err.code in (Code.UNAVAILABLE, Code.UPSTREAM_ERROR)


# Bytes of an error answer's body read for its OCI error code.
ERROR_BODY_MAX: Final = 4096


def _unreachable(upstream: str, exc: BaseException) -> OciError:
    return OciError(
        Code.UNAVAILABLE,
        "upstream registry unreachable",
        {"upstream": upstream, "reason": type(exc).__name__},
    )


def _host_of(url: URL) -> str:
    host = url.host or ""
    shown = f"[{host}]" if ":" in host else host
    return shown if url.port is None or url.is_default_port() else f"{shown}:{url.port}"


def status_error(upstream: str, resp: aiohttp.ClientResponse, unknown: Code) -> OciError:
    """Translate a non-success upstream status into what our client gets."""
    detail = {"upstream": upstream, "status": resp.status}
    if resp.status == 404:
        return OciError(unknown, "not found upstream", detail)
    if resp.status == 429:
        seconds = parse_count(resp.headers.get("Retry-After", ""))
        # An HTTP date, garbage or a digit bomb: a minute is what Docker Hub asks for.
        retry_after = "60" if seconds is None else str(min(seconds, 86400))
        return OciError(
            Code.TOOMANYREQUESTS,
            "upstream rate limit reached",
            detail,
            headers={"Retry-After": retry_after},
        )
    if resp.status in (401, 403):
        return OciError(Code.DENIED, "upstream denied access", detail)
    if resp.status == 416:
        return OciError(Code.RANGE_INVALID, "upstream refused the range", detail)
    return OciError(Code.UPSTREAM_ERROR, "unexpected upstream answer", detail)


@dataclass(frozen=True, slots=True)
class Sessions:
    """Two connection pools: one for blob downloads, one for everything else (manifests,
    tokens, access checks, tags), so that short requests never wait behind long ones."""

    api: aiohttp.ClientSession
    blobs: aiohttp.ClientSession


class TokenShare(Protocol):
    """Upstream tokens other replicas fetched, per upstream, identity and scope (a cluster)."""

    async def get(self, upstream: str, who: str, scope: str) -> tuple[str, float] | None: ...

    async def put(self, upstream: str, who: str, scope: str, value: str, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ManifestReply:
    body: bytes  # empty for HEAD
    media_type: str
    digest: str | None  # upstream's Docker-Content-Digest, if it sent one
    size: int


@dataclass(frozen=True, slots=True)
class ReferrersReply:
    descriptors: tuple[Descriptor, ...]
    truncated: bool  # more than the limit, or paging stopped early: some were left out
    filtered: bool  # upstream said it applied the artifactType filter to every page
    dropped: int  # entries that were not valid referrer descriptors


class UpstreamClient:
    """One configured upstream registry."""

    def __init__(
        self,
        cfg: UpstreamConfig,
        sessions: Sessions,
        settings: Settings,
        stored_credentials: tuple[str, str] | None = None,
        shared_tokens: TokenShare | None = None,
    ) -> None:
        self.cfg = cfg
        self._shared_tokens = shared_tokens
        # Which credentials a shared token belongs to, without naming them.
        self._who = hashlib.sha256(f"{cfg.url}\n{cfg.username or ''}".encode()).hexdigest()[:16]
        self.name = cfg.name
        self.url = URL(cfg.url)
        self._session = sessions.api
        self._blob_session = sessions.blobs
        self.blob_slots = Slots(settings.upstream_blob_connections)
        # Offline: no connection is ever opened; every request fails here, before the network.
        self.offline = settings.offline
        self._manifest_timeout = aiohttp.ClientTimeout(total=settings.manifest_timeout)
        # The blob pool has no limit of its own (``blob_slots`` queues downloads), so connect
        # covers resolving and connecting only, never a wait for a pool slot.
        self._blob_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.blob_connect_timeout,
            sock_connect=settings.blob_connect_timeout,
            sock_read=settings.blob_read_timeout,
        )
        self._tokens: LRUCache[str, Token] = LRUCache(maxsize=4096)
        self._basic: str | None = None
        self._token_lock = asyncio.Lock()
        self._credentials: tuple[str, str] | None = None
        self._credentials_until = 0.0
        self._stored_credentials = stored_credentials
        self.ratelimit_remaining: str | None = None
        self.host = _host_of(self.url)
        self.health = Health()
        self.observer: Observer = NoObserver()

    # --- failures ----------------------------------------------------------------------------

    def report(self, operation: str, host: str, cause: Cause) -> None:
        """Log, count and remember one failed exchange."""
        self.health.failed(operation, host, cause)
        self.observer.failed(self.name, operation, cause)
        log.warning(
            "upstream_failed",
            upstream=self.name,
            host=host,
            operation=operation,
            cause=cause.text,
            kind=cause.kind,
            errno=cause.errno,
            status=cause.status,
            code=cause.code,
        )

    def unreachable(self, exc: BaseException, operation: str, host: str | None = None) -> OciError:
        self.report(operation, host or self.host, failures.cause_of(exc))
        return _unreachable(self.name, exc)

    def bad_answer(self, operation: str, message: str, code: Code = Code.UPSTREAM_ERROR) -> OciError:
        """Upstream answered something we cannot use: reported, and the client's error."""
        self.report(operation, self.host, failures.bad_answer(message))
        return OciError(code, message, {"upstream": self.name})

    async def refusal(self, resp: aiohttp.ClientResponse, unknown: Code, operation: str) -> OciError:
        """The client's error for a non-success answer; reported unless it is an answer about
        the content (404, 416). Reads at most a little of the body, for its OCI error code."""
        err = status_error(self.name, resp, unknown)
        if resp.status in ANSWERS:
            return err
        body = b""
        if resp.method != "HEAD":
            try:
                async with asyncio.timeout(2):
                    body = await resp.content.read(ERROR_BODY_MAX)
            except (*_TRANSPORT_ERRORS, ValueError):
                body = b""
        self.report(operation, _host_of(resp.url), failures.status_cause(resp.status, body))
        return err

    # --- credentials and tokens ------------------------------------------------------------

    async def credentials(self) -> tuple[str, str] | None:
        if self.cfg.username is not None and self.cfg.password is not None:
            return (self.cfg.username, self.cfg.password)
        if self.cfg.credential_command is None:
            return self._stored_credentials
        if self._credentials is not None and time.monotonic() < self._credentials_until:
            return self._credentials
        self._credentials = await run_helper(self.cfg.credential_command, self.cfg.username, self.name)
        self._credentials_until = time.monotonic() + self.cfg.credential_ttl
        return self._credentials

    def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None and token.fresh():
            return f"Bearer {token.value}"
        return self._basic

    async def _authenticate(self, challenge: Challenge, scope: str, refused: str | None = None) -> None:
        creds = await self.credentials()
        if challenge.scheme == "basic":
            if creds is None:
                self.report(
                    failures.TOKEN,
                    self.host,
                    failures.Cause("status", "HTTP 401: credentials required", status=401),
                )
                raise OciError(Code.DENIED, "upstream requires credentials", {"upstream": self.name})
            self._basic = basic_header(*creds)
            return
        if challenge.scheme != "bearer" or not challenge.realm:
            raise self.bad_answer(failures.TOKEN, "unsupported upstream challenge")
        realm = peer_url(challenge.realm)
        if realm is None:
            raise self.bad_answer(failures.TOKEN, "upstream token realm is not a URL")
        if not realm_allowed(realm, self.url, self.cfg.realm_hosts):
            log.warning("token_realm_refused", upstream=self.name, realm_host=realm.host)
            raise OciError(
                Code.DENIED,
                "upstream named a token service this proxy does not trust",
                {"upstream": self.name},
            )
        if self.offline:
            raise OciError(Code.UNAVAILABLE, "the proxy is offline", {"upstream": self.name, "offline": True})
        async with self._token_lock:
            token = self._tokens.get(scope)
            if token is not None and token.fresh():
                return
            if self._shared_tokens is not None:
                shared = await self._shared_tokens.get(self.name, self._who, scope)
                if shared is not None and shared[0] != refused:
                    # Another replica's token for the same credentials and scope.
                    self._tokens[scope] = Token(shared[0], time.monotonic() + shared[1])
                    if self._tokens[scope].fresh():
                        return
            headers = {"Authorization": basic_header(*creds)} if creds else {}
            url = token_request_url(challenge, scope)
            started = time.monotonic()
            try:
                async with self._session.get(
                    url, headers=headers, allow_redirects=False, timeout=self._manifest_timeout
                ) as resp:
                    self.observer.exchanged(self.name, failures.TOKEN, time.monotonic() - started)
                    if resp.status != 200:
                        raise await self.refusal(resp, Code.NAME_UNKNOWN, failures.TOKEN)
                    body = jsontext.loads(await read_body(resp, TOKEN_MAX, self.name, "token answer"))
            except _TRANSPORT_ERRORS as exc:
                raise self.unreachable(exc, failures.TOKEN, _host_of(url)) from exc
            except ValueError as exc:
                raise self.bad_answer(failures.TOKEN, "token answer is not JSON") from exc
            now = time.monotonic()
            token = parse_token_response(body, now)
            if token is None:
                raise self.bad_answer(failures.TOKEN, "token answer has no token")
            self.health.succeeded()
            self._tokens[scope] = token
            if self._shared_tokens is not None:
                await self._shared_tokens.put(
                    self.name, self._who, scope, token.value, token.expires_at - now
                )

    # --- requests --------------------------------------------------------------------------

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: URL,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        operation: str,
    ) -> aiohttp.ClientResponse:
        """Send, following redirects ourselves: credentials stay on the upstream's origin, and
        no redirect leads to an address we refuse. Timed up to the final answer's headers."""
        if self.offline:
            raise OciError(Code.UNAVAILABLE, "the proxy is offline", {"upstream": self.name, "offline": True})
        started = time.monotonic()
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await session.request(
                    method, url, headers=headers, allow_redirects=False, timeout=timeout
                )
            except _TRANSPORT_ERRORS as exc:
                raise self.unreachable(exc, operation, _host_of(url)) from exc
            location = resp.headers.get("Location")
            if resp.status not in _REDIRECTS or location is None:
                self.observer.exchanged(self.name, operation, time.monotonic() - started)
                if resp.status < 500 and resp.status != 429:
                    self.health.succeeded()
                return resp
            resp.release()
            target = peer_url(location, url, encoded=True)
            if target is None:
                raise self.bad_answer(operation, "upstream redirected to an address that is not a URL")
            if not redirect_allowed(target, self.url):
                log.warning("redirect_refused", upstream=self.name, target_host=target.host)
                raise self.bad_answer(operation, "upstream redirected to a forbidden address")
            if not same_origin(target, self.url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if resp.status == 303:
                method = "GET"
            url = target
        raise self.bad_answer(operation, "too many upstream redirects")

    async def request(
        self,
        method: str,
        path: str,
        *,
        repository: str,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        query: Mapping[str, str] | None = None,
        blob: bool = False,
        operation: str,
    ) -> aiohttp.ClientResponse:
        """One authenticated request; the caller releases the response. ``blob`` requests go
        through the blob connection pool."""
        url = self.url.with_path(self.url.path.rstrip("/") + path, encoded=False)
        if query:
            url = url.with_query(query)
        scope = pull_scope(repository)
        for attempt in (1, 2):
            hdrs = dict(headers or {})
            auth = self._auth_header(scope)
            if auth is not None:
                hdrs["Authorization"] = auth
            session = self._blob_session if blob else self._session
            resp = await self._send(session, method, url, hdrs, timeout or self._manifest_timeout, operation)
            self._note_ratelimit(resp)
            if resp.status != 401 or attempt == 2:
                return resp
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.release()
            if challenge is None:
                self.report(operation, self.host, failures.status_cause(401))
                raise OciError(Code.DENIED, "upstream denied access", {"upstream": self.name})
            # A 401 with a token we already had means it expired or was revoked: get a new one.
            had = self._tokens.pop(scope, None)
            await self._authenticate(challenge, scope, refused=None if had is None else had.value)
        raise AssertionError("unreachable")

    def _note_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None and remaining != self.ratelimit_remaining:
            self.ratelimit_remaining = remaining
            log.info(
                "upstream_ratelimit",
                upstream=self.name,
                remaining=remaining,
                limit=resp.headers.get("ratelimit-limit"),
            )

    # --- the registry API --------------------------------------------------------------------

    async def manifest(self, method: str, repository: str, reference: str, accept: str) -> ManifestReply:
        operation = failures.HEAD if method == "HEAD" else failures.MANIFEST
        resp = await self.request(
            method,
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            headers={"Accept": accept, "Accept-Encoding": "identity"},
            operation=operation,
        )
        try:
            if resp.status != 200:
                raise await self.refusal(resp, Code.MANIFEST_UNKNOWN, operation)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = resp.headers.get("Docker-Content-Digest")
            if method == "HEAD":
                size = parse_count(resp.headers.get("Content-Length", "")) or 0
                return ManifestReply(b"", media_type, digest, size)
            body = await self._read(resp, MANIFEST_MAX, "manifest", operation)
            self.observer.received(self.name, operation, len(body))
            return ManifestReply(body, media_type, digest, len(body))
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc, operation, _host_of(resp.url)) from exc
        finally:
            resp.release()

    async def _read(self, resp: aiohttp.ClientResponse, limit: int, what: str, operation: str) -> bytes:
        try:
            return await read_body(resp, limit, self.name, what)
        except OciError as err:
            self.report(operation, _host_of(resp.url), failures.bad_answer(err.message))
            raise

    async def open_blob(
        self, repository: str, digest: Digest, offset: int = 0, end: int | None = None
    ) -> BlobStream:
        """Start a blob download of bytes [``offset``, ``end``) (to the blob's end if ``end`` is
        None). The stream must be closed by the caller. An upstream may ignore the range and
        answer from 0 (``stream.start``), or to its end (``stream.end``)."""
        headers = {"Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end - 1}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        await self.blob_slots.acquire()
        try:
            resp = await self.request(
                "GET",
                f"/v2/{repository}/blobs/{digest}",
                repository=repository,
                headers=headers,
                timeout=self._blob_timeout,
                blob=True,
                operation=failures.BLOB,
            )
            if resp.status != 200 and not (resp.status == 206 and "Range" in headers):
                try:
                    err = await self.refusal(resp, Code.BLOB_UNKNOWN, failures.BLOB)
                finally:
                    resp.release()
                raise err
            try:
                stream = blob_stream(self.name, resp, offset, "Range" in headers, self.blob_slots)
            except OciError as err:
                self.report(failures.BLOB, _host_of(resp.url), failures.bad_answer(err.message))
                raise
        except BaseException:
            self.blob_slots.release()
            raise
        host = _host_of(resp.url)
        stream.failed = lambda exc: self.unreachable(exc, failures.BLOB, host)
        return stream

    async def blob_exists(self, repository: str, digest: Digest) -> bool:
        return await self._exists(f"/v2/{repository}/blobs/{digest}", repository, {})

    async def blob_size(self, repository: str, digest: Digest) -> int | None:
        """Upstream's answer to a blob HEAD: its size (None if it gave none); raises its error."""
        resp = await self.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            repository=repository,
            headers={"Accept-Encoding": "identity"},
            operation=failures.HEAD,
        )
        try:
            if resp.status != 200:
                raise await self.refusal(resp, Code.BLOB_UNKNOWN, failures.HEAD)
            return parse_count(resp.headers.get("Content-Length", ""))
        finally:
            resp.release()

    async def manifest_exists(self, repository: str, digest: Digest) -> bool:
        return await self._exists(
            f"/v2/{repository}/manifests/{digest}", repository, {"Accept": ", ".join(MANIFEST_TYPES)}
        )

    async def _exists(self, path: str, repository: str, headers: dict[str, str]) -> bool:
        resp = await self.request(
            "HEAD", path, repository=repository, headers=headers, operation=failures.HEAD
        )
        try:
            if resp.status == 200:
                return True
            if resp.status in (401, 403, 404):
                return False
            raise await self.refusal(resp, Code.BLOB_UNKNOWN, failures.HEAD)
        finally:
            resp.release()

    async def tags(self, repository: str, query: Mapping[str, str]) -> tuple[bytes, str | None]:
        resp = await self.request(
            "GET", f"/v2/{repository}/tags/list", repository=repository, query=query, operation=failures.TAGS
        )
        try:
            if resp.status != 200:
                raise await self.refusal(resp, Code.NAME_UNKNOWN, failures.TAGS)
            body = await self._read(resp, TAGS_MAX, "tags list", failures.TAGS)
            if not _is_tags_list(body):
                raise self.bad_answer(failures.TAGS, "upstream tags list is not one")
            return body, resp.headers.get("Link")
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc, failures.TAGS, _host_of(resp.url)) from exc
        finally:
            resp.release()

    async def referrers(
        self, repository: str, subject: Digest, artifact_type: str | None, limit: int
    ) -> ReferrersReply | None:
        """The referrers of ``subject``, following upstream's pages up to ``limit`` descriptors
        within one manifest timeout; None when upstream has no referrers API (404 or 405,
        also after a redirect: ghcr.io answers a 303 to a 404).

        A next page is followed only on upstream's own origin and this very path, and only
        while pages bring descriptors not seen yet: a Link elsewhere, back to a page we read,
        or paging without end stops there, and the answer says it was cut short."""
        path = f"/v2/{repository}/referrers/{subject}"
        own_path = self.url.path.rstrip("/") + path
        query: dict[str, str] = {} if artifact_type is None else {"artifactType": artifact_type}
        found: dict[str, Descriptor] = {}
        filtered = True
        dropped = 0
        truncated = False
        pages: set[str] = set()
        try:
            async with asyncio.timeout(self._manifest_timeout.total):
                for page in range(REFERRERS_PAGES_MAX):
                    body, link, applied, status = await self._referrers_page(path, repository, query)
                    if status in _NO_REFERRERS_API:
                        if page == 0:
                            return None
                        raise OciError(
                            Code.UPSTREAM_ERROR, "upstream referrers page vanished", {"upstream": self.name}
                        )
                    try:
                        descriptors, bad = parse_index(body)
                    except NotAnIndex as exc:
                        log.warning("upstream_referrers_not_an_index", upstream=self.name, reason=str(exc))
                        raise OciError(
                            Code.UPSTREAM_ERROR,
                            "upstream referrers answer is not an image index",
                            {"upstream": self.name},
                        ) from exc
                    filtered = filtered and applied
                    dropped += bad
                    fresh = [d for d in descriptors if d.digest not in found]
                    for d in fresh:
                        if len(found) >= limit:
                            truncated = True
                            break
                        found[d.digest] = d
                    if truncated or link is None:
                        break
                    if len(found) >= limit:
                        # Full, and upstream has more: not one request past the bound.
                        truncated = True
                        break
                    target = next_target(link)
                    if target is None:
                        break
                    next_url = self.url.join(target)
                    where = next_url.raw_query_string
                    if (
                        not same_origin(next_url, self.url)
                        or next_url.raw_path != own_path
                        or len(where) > _LINK_QUERY_MAX
                        or where in pages
                        or not fresh
                    ):
                        log.warning(
                            "upstream_referrers_link_refused",
                            upstream=self.name,
                            repository=repository,
                            off_origin=not same_origin(next_url, self.url),
                            repeated=where in pages or not fresh,
                        )
                        truncated = True
                        break
                    pages.add(where)
                    query = dict(next_url.query)
                else:
                    truncated = True
        except TimeoutError as exc:
            raise self.unreachable(exc, failures.REFERRERS) from exc
        if dropped:
            log.warning(
                "upstream_referrers_dropped", upstream=self.name, repository=repository, dropped=dropped
            )
        if truncated:
            log.warning(
                "referrers_truncated",
                upstream=self.name,
                repository=repository,
                subject=str(subject),
                kept=len(found),
            )
        return ReferrersReply(
            tuple(found.values()), truncated, filtered and artifact_type is not None, dropped
        )

    async def _referrers_page(
        self, path: str, repository: str, query: Mapping[str, str]
    ) -> tuple[bytes, str | None, bool, int]:
        """One page: its body, Link, whether upstream filtered it, and its status."""
        resp = await self.request(
            "GET",
            path,
            repository=repository,
            headers={"Accept": OCI_INDEX, "Accept-Encoding": "identity"},
            query=query,
            operation=failures.REFERRERS,
        )
        try:
            if resp.status in _NO_REFERRERS_API:
                return b"", None, False, resp.status
            if resp.status != 200:
                raise await self.refusal(resp, Code.MANIFEST_UNKNOWN, failures.REFERRERS)
            body = await self._read(resp, PAGE_MAX, "referrers answer", failures.REFERRERS)
            applied = filters_applied(resp.headers.get("OCI-Filters-Applied", ""))
            return body, resp.headers.get("Link"), applied, resp.status
        except _TRANSPORT_ERRORS as exc:
            raise self.unreachable(exc, failures.REFERRERS, _host_of(resp.url)) from exc
        finally:
            resp.release()


async def read_body(resp: aiohttp.ClientResponse, limit: int, upstream: str, what: str) -> bytes:
    """The whole body, to its end; more than ``limit`` bytes is an upstream error.

    One ``read(n)`` returns only what is buffered: a body that arrives in several packets would
    be cut short and still look whole. A body that ends before its Content-Length raises
    aiohttp's payload error, which the caller translates like any broken connection.
    """
    if resp.content_length is not None and resp.content_length > limit:
        raise OciError(Code.UPSTREAM_ERROR, f"upstream {what} too large", {"upstream": upstream})
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > limit:
            raise OciError(Code.UPSTREAM_ERROR, f"upstream {what} too large", {"upstream": upstream})
        parts.append(chunk)
    return b"".join(parts)


def blob_stream(
    source: str, resp: aiohttp.ClientResponse, offset: int, asked_range: bool, slots: Slots
) -> BlobStream:
    """The stream a blob GET's answer is, from ``offset`` (if ``asked_range``); raises the OCI
    error its status means (and releases it). The caller releases ``slots`` on an error."""
    if resp.status == 200:
        start, stop = 0, None
    elif resp.status == 206 and asked_range:
        span = _content_range(resp.headers.get("Content-Range", ""))
        if span is None or span[0] > offset:
            resp.release()
            raise OciError(Code.UPSTREAM_ERROR, "bad Content-Range", {"upstream": source})
        start, stop = span
    else:
        err = status_error(source, resp, Code.BLOB_UNKNOWN)
        resp.release()
        raise err
    total = _total_size(resp, start)
    stream_end = stop if stop is not None else (total if total is not None else -1)
    return BlobStream(source, resp, start, total, slots, end=stream_end, ranged=stop is not None)


def _is_tags_list(body: bytes) -> bool:
    """``{"name": ..., "tags": [...]}`` (distribution sends ``null`` for no tags)."""
    try:
        doc = jsontext.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and (doc.get("tags") is None or isinstance(doc["tags"], list))


def _content_range(value: str) -> tuple[int, int] | None:
    """[first, last + 1) of ``bytes first-last/total``."""
    unit, _, rest = value.strip().partition(" ")
    span, _, _ = rest.partition("/")
    first, dash, last = span.partition("-")
    if unit != "bytes" or not dash:
        return None
    a, b = parse_count(first), parse_count(last)
    if a is None or b is None or b < a:
        return None
    return a, b + 1


def _total_size(resp: aiohttp.ClientResponse, start: int) -> int | None:
    if resp.status == 206:
        return parse_count(resp.headers.get("Content-Range", "").rpartition("/")[2])
    length = parse_count(resp.headers.get("Content-Length", ""))
    return None if length is None else start + length


class BlobStream:
    """An open upstream blob body from byte ``start``; ``total`` is the whole blob's size."""

    def __init__(
        self,
        upstream: str,
        resp: aiohttp.ClientResponse,
        start: int,
        total: int | None,
        slots: Slots,
        *,
        end: int = -1,
        ranged: bool = False,
    ) -> None:
        self._upstream = upstream
        self._resp = resp
        self._slots: Slots | None = slots
        self.start = start
        self.total = total
        self.end = end  # where this answer's bytes stop (exclusive); -1 if upstream did not say
        self.ranged = ranged  # upstream honoured a Range (206)
        # How a broken body becomes the client's error (an upstream reports it as its failure).
        self.failed: Callable[[BaseException], OciError] = lambda exc: _unreachable(upstream, exc)

    async def chunks(self, max_batch: int) -> AsyncIterator[bytes]:
        """Yield the body in pieces of at most about ``max_batch``, joining what is already
        buffered so that each piece costs one worker-thread hop downstream, not one per packet."""
        content = self._resp.content
        try:
            while True:
                first = await content.readany()
                if not first:
                    return
                parts = [first]
                size = len(first)
                while size < max_batch:
                    more = content.read_nowait(max_batch - size)
                    if not more:
                        break
                    parts.append(more)
                    size += len(more)
                yield parts[0] if len(parts) == 1 else b"".join(parts)
        except _TRANSPORT_ERRORS as exc:
            raise self.failed(exc) from exc

    def close(self) -> None:
        # A body read to its end leaves a connection the next ranged GET can reuse; one cut
        # short must not be reused (its unread bytes would be taken for the next answer).
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()
        if self._slots is not None:
            self._slots.release()
            self._slots = None
