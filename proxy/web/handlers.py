"""Thin handlers: parse the request into values, call the domain, write the response. Blobs
are :mod:`proxy.web.blobs`'.

Each handler records what it did in ``request[CACHE_RESULT]`` / ``request[SENT]`` for the one
log line the middleware in :mod:`app` writes per request.
"""

from __future__ import annotations

import json
from typing import Final

import structlog
from aiohttp import web

from proxy.core.digits import parse_count
from proxy.core.errors import Code, OciError
from proxy.core.links import next_link
from proxy.core.mediatypes import OCI_INDEX
from proxy.core.reference import Digest, Kind, PathRequest, parse_path
from proxy.core.referrers import FILTER, artifact_type_filter, index_body
from proxy.core.routing import Route, route
from proxy.upstream.client import UpstreamClient
from proxy.web import blobs, keys
from proxy.web.blobs import API_VERSION
from proxy.workers import internal

log = structlog.get_logger("ocicache.handlers")

# Manifest answers a front worker may give again (not "stale": upstream is asked each time).
REUSABLE: Final = frozenset({"hit", "miss", "revalidated", "offline", "shared"})


async def base(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        raise OciError(Code.UNSUPPORTED, "this proxy serves pulls only")
    return web.json_response({}, headers=API_VERSION)


async def registry_api(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise OciError(Code.UNSUPPORTED, "this proxy serves pulls only", {"method": request.method})
    parsed, where = _resolve(request)
    client = request.app[keys.UPSTREAMS][where.upstream]
    request[keys.KIND] = parsed.kind.value
    request[keys.UPSTREAM] = client.name
    if parsed.kind is Kind.MANIFEST:
        assert parsed.reference is not None
        return await manifest(request, client, where.repository, parsed.reference)
    if parsed.kind is Kind.BLOB:
        assert isinstance(parsed.reference, Digest)
        return await blobs.blob(request, client, where.repository, parsed.reference)
    if parsed.kind is Kind.REFERRERS:
        assert isinstance(parsed.reference, Digest)
        return await referrers(request, client, where.repository, parsed.reference)
    return await tags(request, client, where.repository)


def _resolve(request: web.Request) -> tuple[PathRequest, Route]:
    """What the path asks for, and of which upstream and repository. Pulls repeat the same few
    paths (every node asks for the same image), so answers are remembered by path and ns=;
    malformed ones raise and are not."""
    key = (request.rel_url.raw_path, request.query.get("ns"))
    resolved = request.app[keys.RESOLVED]
    known = resolved.get(key)
    if known is None:
        settings = request.app[keys.SETTINGS]
        parsed = parse_path(key[0])
        names = request.app[keys.UPSTREAMS].keys()
        known = (parsed, route(parsed.name, key[1], names, settings.default_upstream.name))
        resolved[key] = known
    return known


async def manifest(
    request: web.Request, client: UpstreamClient, repository: str, reference: Digest | str
) -> web.Response:
    store = request.app[keys.MANIFESTS]
    served = await store.get(client, repository, reference, request.headers.getall("Accept", []))
    request[keys.CACHE_RESULT] = served.source
    if isinstance(reference, str):
        # A pull asks for its tag once: the status page's pulls by image.
        request.app[keys.PULLS].count(client.name, repository, reference, served.source)
    request[keys.SENT] = 0 if request.method == "HEAD" else served.size
    headers = {
        **API_VERSION,
        "Content-Type": served.media_type,
        "Docker-Content-Digest": str(served.digest),
        "ETag": f'"{served.digest}"',
    }
    if request.get(keys.VIA_WORKER) and served.source in REUSABLE:
        fresh = store.fresh_for(client, repository, reference, request.headers.getall("Accept", []))
        headers[internal.REUSE] = repr(internal.reuse_for(fresh))
        if served.source == "offline":
            headers[internal.SOURCE] = "offline"
    return web.Response(body=served.body, headers=headers)


async def referrers(
    request: web.Request, client: UpstreamClient, repository: str, subject: Digest
) -> web.Response:
    """Always an image index for a valid subject (see :mod:`proxy.flows.referrers`)."""
    artifact_type = artifact_type_filter(request.query.getall(FILTER, []))
    served = await request.app[keys.REFERRERS].get(client, repository, subject, artifact_type)
    body = index_body(served.descriptors)
    headers = {**API_VERSION, "Content-Type": OCI_INDEX}
    if served.filtered:
        headers["OCI-Filters-Applied"] = FILTER
    request[keys.CACHE_RESULT] = served.source
    request[keys.SENT] = 0 if request.method == "HEAD" else len(body)
    return web.Response(body=body, headers=headers)


async def tags(request: web.Request, client: UpstreamClient, repository: str) -> web.Response:
    settings = request.app[keys.SETTINGS]
    query: dict[str, str] = {}
    n = parse_count(request.query.get("n", str(settings.tags_page_max)))
    if n is None:
        raise OciError(Code.PAGINATION_INVALID, "n must be a number")
    query["n"] = str(min(n, settings.tags_page_max))
    if "last" in request.query:
        query["last"] = request.query["last"]
    headers = {**API_VERSION, "Content-Type": "application/json"}
    if client.offline:
        # Offline, the tags this cache knows are the answer (a page of them, like upstream's).
        known = request.app[keys.CATALOGUE].tag_names(client.name, repository)
        if not known:
            raise OciError(Code.NAME_UNKNOWN, "no tags cached, and the proxy is offline", {"offline": True})
        page, more = tags_page(known, int(query["n"]), query.get("last"))
        if more:
            ours = next_link(
                f'<?n={query["n"]}&last={page[-1]}>; rel="next"', request.rel_url.path, _routing(request)
            )
            if ours is not None:
                headers["Link"] = ours
        request[keys.CACHE_RESULT] = "offline"
        body = json.dumps({"name": repository, "tags": page}).encode()
        return web.Response(body=body, headers=headers)
    body, link = await client.tags(repository, query)
    ours = None if link is None else next_link(link, request.rel_url.path, _routing(request))
    if ours is not None:
        headers["Link"] = ours
    request[keys.CACHE_RESULT] = "pass"
    return web.Response(body=body, headers=headers)


def tags_page(names: list[str], n: int, last: str | None) -> tuple[list[str], bool]:
    """A page of sorted tag ``names`` after ``last``, at most ``n``; and whether a next page
    follows it (never after an empty page, ``n=0``: it has no last tag to continue from)."""
    ordered = sorted(names)
    if last is not None:
        ordered = [t for t in ordered if t > last]
    page = ordered[:n]
    return page, bool(page) and len(ordered) > n


def _routing(request: web.Request) -> dict[str, str]:
    """The query parameters that chose the upstream, for links back to us."""
    ns = request.query.get("ns")
    return {} if ns is None else {"ns": ns}


async def not_found(request: web.Request) -> web.Response:
    raise OciError(Code.NAME_UNKNOWN, "no such endpoint")
