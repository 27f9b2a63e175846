"""The token endpoint (``/auth/token``), where clients trade a login for a short-lived token.

The proxy's challenges name it as their realm. Clients call it the way the distribution
token-auth spec has them call Docker Hub's:

* ``GET`` with Basic credentials (Docker, containers/image, containerd without a secret),
  or with none for an anonymous token; answered with ``{"token", "access_token", ...}``;
* ``POST`` with ``grant_type=password&username=...&password=...`` (containerd when it has a
  secret, the OAuth2 form); ``refresh_token`` grants are not offered, so containerd falls back
  to GET on the 405.

The token stands for the user, not for a scope: every request is held to ``auth.rules``
afresh, so there is nothing to gain from asking for a wider scope. A static token (from
``tokens_file``) may also be traded; a token this endpoint issued may not, so a session ends
when its token does.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from aiohttp import hdrs, web

from proxy.core.authorization import Basic
from proxy.core.errors import Code, OciError
from proxy.web import keys
from proxy.web.guard import Principal


async def token(request: web.Request) -> web.Response:
    guard = request.app[keys.GUARD]
    principal: Principal | None
    if request.method == hdrs.METH_POST:
        try:
            # A body trickled in byte by byte would hold this handler for as long as the
            # client likes: it gets the time a request head gets.
            async with asyncio.timeout(request.app[keys.SETTINGS].header_timeout):
                form = await request.post()
        except TimeoutError:
            raise OciError(Code.REQUEST_TIMEOUT, "token request body not received in time") from None
        except (ValueError, web.HTTPRequestEntityTooLarge):
            # A login that is not one: refused like any other, never an error of ours.
            raise guard.unauthorized(request, "malformed token request") from None
        grant = form.get("grant_type")
        if grant != "password":
            raise OciError(
                Code.UNSUPPORTED, "only grant_type=password is offered", {"grant_type": str(grant)[:40]}
            )
        username, password = form.get("username"), form.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username:
            raise guard.unauthorized(request, "username and password are required")
        principal = await guard.authenticate(request, Basic(username, password), issued=False)
    elif request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
        credential = guard.credential(request)
        if credential is None:
            if not guard.auth.anonymous:
                raise guard.unauthorized(request, "authentication required")
            principal = None
        else:
            principal = await guard.authenticate(request, credential, issued=False)
    else:
        raise OciError(Code.UNSUPPORTED, "GET or POST")
    user = None if principal is None else principal.user
    request[keys.USER] = user
    epoch = "" if user is None else guard.accounts.epoch(user) or ""
    issued, at = guard.signer.issue(user, epoch)
    return web.json_response(
        {
            "token": issued,
            "access_token": issued,
            "expires_in": guard.signer.ttl,
            "issued_at": datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z"),
        },
        headers={"Cache-Control": "no-store"},
    )
