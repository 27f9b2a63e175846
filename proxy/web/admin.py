"""The admin API under ``/admin/v1/``: JSON for operators and for ``ocicache ls|rm|prefetch|pin
--proxy URL``.

Off unless an admin token is configured (``admin_token_env`` or ``OCICACHE_ADMIN_TOKEN``): its
routes are not even there. Every request carries ``Authorization: Bearer TOKEN``, checked in
constant time (:mod:`proxy.core.admintoken`); anything else is 401. The admin token is not a
client login: the client-auth gate lets these routes through to this check.

    GET    /admin/v1/images                  the rows of ``ocicache ls``
    DELETE /admin/v1/images/{reference}      purge; blobs other images or pins need stay
    GET    /admin/v1/stats                   what the status page shows, as JSON
    GET    /admin/v1/pins                    pins, and where each comes from
    PUT    /admin/v1/pins/{reference}        pin (kept across restarts)
    DELETE /admin/v1/pins/{reference}        unpin (pins from the config file stay)
    POST   /admin/v1/prefetch                {"references": [...], "platforms": [...]} -> job id
    GET    /admin/v1/jobs/{id}               per-blob progress and the outcome
    GET    /admin/v1/jobs                    every job remembered
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import StreamReader, hdrs, web

from proxy.airgap.graph import BadPlatform, parse_platform
from proxy.airgap.removal import remove_images
from proxy.core import jsontext
from proxy.core.admintoken import carries, fingerprint
from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.core.imageref import BadReference, ImageRef, parse_image_reference
from proxy.store.images import ImageRow, image_rows
from proxy.web import keys
from proxy.web.overview import overview

PREFIX: Final = "/admin/v1"
# A prefetch request lists references; more than this is a request to split.
MAX_REFERENCES: Final = 1000
BODY_MAX: Final = 256 * 1024
# The longest a job request waits for the job to end (?wait=).
MAX_WAIT: Final = 60

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ADMIN_TOKEN: Final = web.AppKey("admin_token", bytes)


def _guarded(handler: Handler) -> Handler:
    async def check(request: web.Request) -> web.StreamResponse:
        if not carries(request.headers.getall(hdrs.AUTHORIZATION, []), request.app[ADMIN_TOKEN]):
            raise OciError(
                Code.UNAUTHORIZED,
                "the admin API needs Authorization: Bearer <admin token>",
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="ocicache-admin"'},
            )
        request[keys.KIND] = "admin"
        return await handler(request)

    check.__name__ = handler.__name__
    check.__doc__ = handler.__doc__
    return check


def row_json(row: ImageRow) -> dict[str, Any]:
    return {
        "reference": row.reference,
        "upstream": row.upstream,
        "repository": row.repository,
        "tag": row.tag,
        "digest": row.digest,
        "media_type": row.media_type,
        "platforms": list(row.platforms),
        "size": row.size,
        "last_used": row.last_used,
        "pinned": row.pinned,
    }


def _reference(request: web.Request, text: str) -> ImageRef:
    names = [u.name for u in request.app[keys.SETTINGS].upstreams]
    try:
        return parse_image_reference(text, names, names[0])
    except BadReference as exc:
        raise OciError(Code.NAME_INVALID, str(exc)[:300]) from None


async def read_json(stream: StreamReader, length: int | None) -> Any:
    """The whole body as JSON, to its end, at most ``BODY_MAX`` bytes."""
    if length is not None and length > BODY_MAX:
        raise OciError(Code.REQUEST_INVALID, "request body too large")
    parts: list[bytes] = []
    size = 0
    # One read() returns what is buffered, not the body: read to the end.
    while chunk := await stream.readany():
        size += len(chunk)
        if size > BODY_MAX:
            raise OciError(Code.REQUEST_INVALID, "request body too large")
        parts.append(chunk)
    try:
        return jsontext.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise OciError(Code.REQUEST_INVALID, "the body must be JSON") from None


async def images(request: web.Request) -> web.Response:
    engine = request.app[keys.ENGINE]
    rows = image_rows(engine.catalogue, engine.pinned())
    return web.json_response({"images": [row_json(r) for r in rows]})


async def delete_image(request: web.Request) -> web.Response:
    """As ``ocicache rm REF``: the image and the files only it needs."""
    ref = _reference(request, request.match_info["reference"])
    report = await remove_images(request.app[keys.ENGINE], [ref])
    if report.unknown:
        raise OciError(
            Code.MANIFEST_UNKNOWN, "the cache holds no image by that reference", {"reference": str(ref)}
        )
    if report.pinned:
        raise OciError(
            Code.CONFLICT, "pinned: unpin it first", {"pinned": [r.reference for r in report.pinned]}
        )
    return web.json_response(
        {"removed": [row_json(r) for r in report.removed], "files": report.blobs, "freed": report.bytes}
    )


async def stats(request: web.Request) -> web.Response:
    return web.json_response(overview(request.app).to_json())


async def pins(request: web.Request) -> web.Response:
    catalogue = request.app[keys.CATALOGUE]
    return web.json_response(
        {"pins": [{"reference": r, "source": s} for r, s in sorted(catalogue.pins.items())]}
    )


async def put_pin(request: web.Request) -> web.Response:
    ref = _reference(request, request.match_info["reference"])
    catalogue = request.app[keys.CATALOGUE]
    reference = str(ref)
    created = reference not in catalogue.pins
    if catalogue.pins.get(reference) != "config":
        await catalogue.add_pin(reference, "admin")
    return web.json_response(
        {"reference": reference, "source": catalogue.pins[reference]}, status=201 if created else 200
    )


async def delete_pin(request: web.Request) -> web.Response:
    ref = _reference(request, request.match_info["reference"])
    catalogue = request.app[keys.CATALOGUE]
    reference = str(ref)
    source = catalogue.pins.get(reference)
    if source is None:
        raise OciError(Code.MANIFEST_UNKNOWN, "not pinned", {"reference": reference})
    if source == "config":
        raise OciError(Code.CONFLICT, "pinned in the config file: remove it there", {"reference": reference})
    await catalogue.remove_pin(reference)
    return web.json_response({"reference": reference, "removed": True})


async def prefetch(request: web.Request) -> web.Response:
    body = await read_json(request.content, request.content_length)
    if not isinstance(body, dict) or not isinstance(body.get("references"), list) or not body["references"]:
        raise OciError(Code.REQUEST_INVALID, 'expected {"references": ["image", ...]}')
    texts = body["references"]
    platforms = body.get("platforms")
    if len(texts) > MAX_REFERENCES or not all(isinstance(t, str) for t in texts):
        raise OciError(Code.REQUEST_INVALID, f"references: up to {MAX_REFERENCES} strings")
    if platforms is not None:
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise OciError(Code.REQUEST_INVALID, 'platforms: a list such as ["linux/amd64"]')
        try:
            platforms = sorted({parse_platform(p) for p in platforms})
        except BadPlatform as exc:
            raise OciError(Code.REQUEST_INVALID, str(exc)) from None
    refs = [_reference(request, t) for t in texts]
    job = request.app[keys.JOBS].submit(refs, platforms)
    return web.json_response(
        {"id": job.id, "state": job.state.value, "url": f"{PREFIX}/jobs/{job.id}"}, status=202
    )


async def job(request: web.Request) -> web.Response:
    """``?wait=SECONDS`` (up to ``MAX_WAIT``): answer when the job has ended, or then."""
    found = request.app[keys.JOBS].get(request.match_info["id"])
    if found is None:
        raise OciError(Code.NAME_UNKNOWN, "no such job")
    if "wait" in request.query:
        seconds = parse_count(request.query["wait"])
        if seconds is None:
            raise OciError(Code.REQUEST_INVALID, "wait= is a number of seconds")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, MAX_WAIT)):
                await found.ended.wait()
    return web.json_response(found.to_json())


async def jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": [j.to_json() for j in request.app[keys.JOBS]]})


ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = tuple(
    (method, PREFIX + path, _guarded(handler))
    for method, path, handler in (
        ("GET", "/images", images),
        ("DELETE", "/images/{reference:.+}", delete_image),
        ("GET", "/stats", stats),
        ("GET", "/pins", pins),
        ("PUT", "/pins/{reference:.+}", put_pin),
        ("DELETE", "/pins/{reference:.+}", delete_pin),
        ("POST", "/prefetch", prefetch),
        ("GET", "/jobs", jobs),
        ("GET", "/jobs/{id}", job),
    )
)


async def _unknown(request: web.Request) -> web.Response:
    raise OciError(Code.NAME_UNKNOWN, "no such admin endpoint")


# Anything else under the prefix: the same check first, then "no such endpoint".
UNKNOWN: Final = _guarded(_unknown)
HANDLERS: Final = (*(handler for _, _, handler in ROUTES), UNKNOWN)


def add_routes(app: web.Application, token: str) -> None:
    app[ADMIN_TOKEN] = fingerprint(token)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_route("*", PREFIX + "/{tail:.*}", UNKNOWN)
