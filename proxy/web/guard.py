"""Who is asking, and may they: client authentication and ``auth.rules`` at the edge.

The middleware runs after routing and before any handler, so a refused request never reaches
a handler and never opens an upstream connection. ``/setup/*``, ``/healthz``, ``/metrics`` and
the token endpoint are public; every other route needs what ``auth`` asks for, and the pull
API (``/v2/<name>/...``) is also held to the rules, which need the routed upstream and
repository.

Costs, since the warm paths are hot: a request with a token this proxy issued costs an HMAC;
a static token a SHA-256 and a dict lookup; Basic credentials verified once before a SHA-256
and a lookup in a bounded cache. Only a credential not seen before costs a bcrypt check, which
runs on the guard's own two worker threads (never the default executor that file I/O uses),
once however many requests carry it at the same moment. Every such check is counted against
the client's address (:mod:`proxy.core.limiter`).

Refusals: no or bad credentials -> 401 ``UNAUTHORIZED`` with a Bearer challenge (an anonymous
client refused by a rule too: logging in may help it); a logged-in client refused by a rule
-> 403 ``DENIED``; an address out of attempts -> 429 with ``Retry-After``. Credentials never
reach a log: only the user name does, once verified.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

import structlog
from aiohttp import hdrs, web
from cachetools import LRUCache

from proxy.core import authorization, tokens
from proxy.core.accounts import Accounts
from proxy.core.authconfig import AuthConfig
from proxy.core.authorization import BadCredentials, Basic, Bearer, Credential
from proxy.core.errors import Code, OciError
from proxy.core.limiter import FailureLimiter, address_key
from proxy.core.rules import Rules
from proxy.core.tokens import Claims, TokenRejected, TokenSigner
from proxy.web.accountfiles import AccountFiles
from proxy.web.address import reached_at

log = structlog.get_logger("ocicache.auth")

TOKEN_PATH: Final = "/auth/token"
# Verified Basic credentials remembered (by SHA-256 of the header); each is a few dozen bytes.
VERIFIED_CACHE: Final = 4096
# Issued tokens already verified, by header value: a dict lookup instead of base64, JSON and an
# HMAC on every request of a pull.
TOKEN_CACHE: Final = 4096
# bcrypt checks waiting at once, over all clients; past it clients are asked to come back.
MAX_PENDING: Final = 64
# How often the credential files are looked at for changes (a stat per file, in a thread).
RELOAD_INTERVAL: Final = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Principal:
    user: str | None  # None: an anonymous client (no credentials, or an anonymous token)


ANONYMOUS: Final = Principal(None)


@dataclass(frozen=True, slots=True)
class _Verified:
    user: str
    generation: int


class Guard:
    def __init__(
        self,
        auth: AuthConfig,
        files: AccountFiles,
        accounts: Accounts,
        signer: TokenSigner,
        executor: Executor,
        *,
        listen_port: int,
        on_refusal: Callable[[str], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = auth
        self.listen_port = listen_port  # for the realm, when a request's Host will not do
        self._on_refusal = on_refusal  # "invalid" or "ratelimited": counted by the app
        self.rules = Rules(auth.rules)
        self.signer = signer
        self.limiter = FailureLimiter(auth.max_failures, auth.failure_window)
        self._files = files
        self._accounts = accounts
        self._executor = executor
        self._clock = clock
        self._verified: LRUCache[bytes, _Verified] = LRUCache(VERIFIED_CACHE)
        self._known_tokens: LRUCache[str, Claims] = LRUCache(TOKEN_CACHE)
        self._pending: dict[bytes, asyncio.Future[bool]] = {}
        self.generation = 0
        self._changed = asyncio.Event()

    @property
    def accounts(self) -> Accounts:
        return self._accounts

    @property
    def logins(self) -> bool:
        return self.auth.logins

    # --- reloading ---------------------------------------------------------------------------

    def _apply(self, fresh: Accounts) -> None:
        self._accounts = fresh
        self.generation += 1
        self._verified.clear()
        self._known_tokens.clear()
        self._changed.set()
        self._changed = asyncio.Event()

    async def reload(self) -> bool:
        """Look at the files now; True if they changed and were taken."""
        loop = asyncio.get_running_loop()
        fresh = await loop.run_in_executor(self._executor, self._files.reload_if_changed)
        if fresh is not None:
            self._apply(fresh)
        return fresh is not None

    async def watch(self, interval: float = RELOAD_INTERVAL) -> None:
        """Runs for the app's life: removed users and changed passwords take effect without
        waiting for anyone to fail a login."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:
                log.exception("accounts_watch_failed")

    async def close(self) -> None:
        """End the bcrypt checks still running (their clients are gone with the app)."""
        running = list(self._pending.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def changed(self, after: int) -> None:
        """Wait until the accounts have been reloaded past generation ``after``."""
        while self.generation <= after:
            await self._changed.wait()

    # --- who is asking -----------------------------------------------------------------------

    def unauthorized(self, request: web.Request, message: str, scope: str | None = None) -> OciError:
        realm = f"{request.scheme}://{reached_at(request, self.listen_port)}{TOKEN_PATH}"
        return OciError(
            Code.UNAUTHORIZED,
            message,
            headers={hdrs.WWW_AUTHENTICATE: authorization.challenge(realm, scope)},
        )

    def credential(self, request: web.Request) -> Credential | None:
        """The credential ``request`` carries; None if none. A malformed one counts as a guess."""
        values: list[str] = request.headers.getall(hdrs.AUTHORIZATION, [])
        if not values:
            return None
        if len(values) > 1:
            raise self._refuse(request, address_key(request.remote), "several Authorization headers")
        try:
            return authorization.parse(values[0])
        except BadCredentials as exc:
            raise self._refuse(request, address_key(request.remote), str(exc)) from None

    async def principal(self, request: web.Request) -> Principal | None:
        """Who sent ``request``; None if it carried no credentials at all."""
        values: list[str] = request.headers.getall(hdrs.AUTHORIZATION, [])
        if len(values) == 1:
            # The warm path: a credential verified before, found without parsing it again.
            claims = self._known_tokens.get(values[0])
            if claims is not None and not self.signer.expired(claims):
                return self._claimed(request, address_key(request.remote), claims)
            hit = self._verified.get(_header_key(values[0]))
            if (
                hit is not None
                and hit.generation == self.generation
                # Not from an address out of attempts: the cache would answer its guesses.
                and self.limiter.retry_after(address_key(request.remote), self._clock()) is None
            ):
                return Principal(hit.user)
        credential = self.credential(request)
        if credential is None:
            return None
        return await self.authenticate(request, credential, issued=True, raw=values[0])

    async def authenticate(
        self, request: web.Request, credential: Credential, *, issued: bool, raw: str | None = None
    ) -> Principal:
        """Verify one credential; ``issued``: accept the tokens this proxy hands out; ``raw``:
        the header it came in, under which a verified issued token is remembered."""
        addr = address_key(request.remote)
        if isinstance(credential, Basic) and credential.anonymous:
            return self._anonymous(request)
        if isinstance(credential, Bearer) and tokens.is_issued(credential.token):
            if not issued:
                raise self._refuse(request, addr, "log in with a user name and password", count=False)
            return self._issued(request, addr, credential.token, raw)
        # A secret we must check against the accounts: that is what guessing costs.
        now = self._clock()
        wait = self.limiter.retry_after(addr, now)
        if wait is not None:
            self._on_refusal("ratelimited")
            raise OciError(
                Code.TOOMANYREQUESTS,
                "too many failed logins from this address",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if isinstance(credential, Bearer):
            self.limiter.attempt(addr, now)
            user = self._accounts.token_user(credential.token)
            if user is None and await self.reload():
                user = self._accounts.token_user(credential.token)
            if user is None:
                raise self._refuse(request, addr, "unknown token", count=False)
            self.limiter.refund(addr)
            return Principal(user)
        key = _cache_key(credential) if raw is None else _header_key(raw)
        hit = self._verified.get(key)
        if hit is not None and hit.generation == self.generation:
            return Principal(hit.user)
        if not await self._check(key, credential, addr, now):
            raise self._refuse(request, addr, "incorrect user name or password", count=False)
        return Principal(credential.username)

    def _anonymous(self, request: web.Request) -> Principal:
        if not self.auth.anonymous:
            raise self.unauthorized(request, "authentication required")
        return ANONYMOUS

    def _issued(self, request: web.Request, addr: str, token: str, raw: str | None) -> Principal:
        try:
            claims = self.signer.verify(token)
        except TokenRejected as exc:
            # An expired token is no guess; a forged one is.
            raise self._refuse(request, addr, str(exc), count=exc.forged) from None
        principal = self._claimed(request, addr, claims)
        if raw is not None:
            self._known_tokens[raw] = claims
        return principal

    def _claimed(self, request: web.Request, addr: str, claims: Claims) -> Principal:
        if claims.user is None:
            return self._anonymous(request)
        if self._accounts.epoch(claims.user) != claims.epoch:
            raise self._refuse(request, addr, "token no longer valid: log in again", count=False)
        return Principal(claims.user)

    async def _check(self, key: bytes, credential: Basic, addr: str, now: float) -> bool:
        """One bcrypt check per distinct credential at a time, however many requests carry it
        (Docker fetches layers in parallel, all with the same login): it costs one attempt,
        refunded if it succeeds."""
        running = self._pending.get(key)
        if running is None:
            if len(self._pending) >= MAX_PENDING:
                raise OciError(
                    Code.TOOMANYREQUESTS, "too many logins being checked", headers={"Retry-After": "1"}
                )
            self.limiter.attempt(addr, now)
            running = asyncio.ensure_future(self._bcrypt(key, credential, addr))
            self._pending[key] = running
            running.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(running)

    async def _bcrypt(self, key: bytes, credential: Basic, addr: str) -> bool:
        loop = asyncio.get_running_loop()

        def check() -> tuple[bool, Accounts | None, Accounts]:
            # A user added a moment ago should not fail: look at the files first (a stat).
            fresh = self._files.reload_if_changed()
            accounts = fresh if fresh is not None else self._accounts
            return accounts.check_password(credential.username, credential.password), fresh, accounts

        ok, fresh, checked = await loop.run_in_executor(self._executor, check)
        if fresh is not None:
            self._apply(fresh)
        if ok:
            self.limiter.refund(addr)
            if checked is self._accounts:
                self._verified[key] = _Verified(credential.username, self.generation)
        return ok

    def _refuse(self, request: web.Request, addr: str, reason: str, *, count: bool = True) -> OciError:
        if count:
            self.limiter.attempt(addr, self._clock())
        self._on_refusal("invalid")
        log.info("login_refused", reason=reason, remote=request.remote, path=request.path)
        return self.unauthorized(request, reason)


def _header_key(raw: str) -> bytes:
    return hashlib.sha256(b"h:" + raw.encode("utf-8", "surrogateescape")).digest()


def _cache_key(credential: Basic) -> bytes:
    user = credential.username.encode("utf-8", "surrogateescape")
    secret = credential.password.encode("utf-8", "surrogateescape")
    return hashlib.sha256(b"%d:%s:%s" % (len(user), user, secret)).digest()
