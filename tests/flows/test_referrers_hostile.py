"""Referrers from a hostile or broken upstream: answers that are not an index, Links that
point elsewhere or loop, descriptors with hostile strings, a filter upstream claims but did not
apply, fallback tags that are not an index. Nothing it sends gets past as a referrer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import StartProxy
from tests.flows.test_referrers import REPO, attach, listed, pull, referrers, upstream_referrers
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    SIGNATURE_TYPE,
    fallback_tag,
    make_image,
    make_index,
    make_referrer,
    referrer_descriptor,
)


def index_of(entries: list[Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def answering(
    pages: Callable[[web.Request], web.StreamResponse | None],
) -> Callable[[web.Request, str, str], web.StreamResponse | None]:
    return lambda request, name, subject: pages(request)


def desc(i: int, **fields: Any) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 10, **fields}


async def test_an_answer_that_is_not_an_index_is_a_502_or_the_stored_one_stale(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject, _sig, _sbom = attach(fake, seed=40)
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0)
    await pull(session, proxy, "v1")
    bad = [b""]
    fake.referrers_hook = answering(
        lambda r: web.Response(body=bad[0], content_type="text/html") if bad[0] else None
    )
    _, _, good = await referrers(session, proxy, subject.manifest_digest)
    for body in (
        b"<html>sign in to the hotel wifi</html>",
        b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}',
        b'{"errors": []}',
        b"[" * 50_000,
    ):
        bad[0] = body
        status, _, doc = await referrers(session, proxy, subject.manifest_digest)
        assert (status, doc) == (200, good), body[:40]
    lonely = make_image(seed=41)
    fake.add_image(REPO, lonely, tag="lonely")
    await pull(session, proxy, "lonely")
    async with session.get(f"{proxy.url}/v2/{REPO}/referrers/{lonely.manifest_digest}") as resp:
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "UPSTREAM_ERROR"
    # Garbage is not "no API": the fallback tag was never asked for.
    assert fake.count(path_contains="/manifests/sha256-") == 0


async def test_a_link_off_origin_or_to_another_path_is_not_followed(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject = make_image(seed=42)
    fake.add_image(REPO, subject, tag="v1")
    ours = f"/v2/{REPO}/referrers/{subject.manifest_digest}"
    async with FakeUpstream() as elsewhere:
        links = [
            f'<{elsewhere.url}/v2/{REPO}/referrers/{subject.manifest_digest}?last=x>; rel="next"',
            # Scheme-relative: the same path on another origin.
            f'<//{elsewhere.url.removeprefix("http://")}{ours}>; rel="next"',
            f'</v2/library/secret/referrers/{subject.manifest_digest}?last=x>; rel="next"',
            f'</v2/{REPO}/manifests/latest>; rel="next"',
            '<javascript:alert(1)>; rel="next"',
            f'</v2/{REPO}/referrers/{subject.manifest_digest}?last={"x" * 5000}>; rel="next"',
        ]
        current = [""]
        fake.referrers_hook = answering(
            lambda r: web.Response(
                body=index_of([desc(1)]), content_type=OCI_INDEX, headers={"Link": current[0]}
            )
        )
        proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0)
        await pull(session, proxy, "v1")
        for link in links:
            current[0] = link
            before = upstream_referrers(fake)
            status, headers, doc = await referrers(session, proxy, subject.manifest_digest)
            assert status == 200, link
            assert listed(doc) == [desc(1)["digest"]]
            assert "Link" not in headers
            assert upstream_referrers(fake) == before + 1, link
        assert elsewhere.seen == []
        assert fake.count(path_contains="/library/secret") == 0


async def test_links_that_loop_or_never_end_stop(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject = make_image(seed=43)
    fake.add_image(REPO, subject, tag="v1")
    path = f"/v2/{REPO}/referrers/{subject.manifest_digest}"
    mode = ["self"]

    def page(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("page", "0"))
        if mode[0] == "self":  # the same page again and again
            entries, nxt = [desc(1)], f"{path}?page=0"
        elif mode[0] == "pingpong":  # page 0 -> 1 -> 0
            entries, nxt = [desc(n)], f"{path}?page={1 - n}"
        elif mode[0] == "empty":  # new empty pages for ever
            entries, nxt = ([desc(1)] if n == 0 else []), f"{path}?page={n + 1}"
        else:  # new descriptors for ever
            entries, nxt = [desc(n)], f"{path}?page={n + 1}"
        return web.Response(
            body=index_of(entries), content_type=OCI_INDEX, headers={"Link": f'<{nxt}>; rel="next"'}
        )

    fake.referrers_hook = answering(page)
    proxy = await start_proxy({"docker.io": fake.url}, referrers_ttl=0.0, referrers_max=50)
    await pull(session, proxy, "v1")
    for name, pages, count in (("self", 2, 1), ("pingpong", 3, 2), ("empty", 2, 1), ("endless", 50, 50)):
        mode[0] = name
        before = upstream_referrers(fake)
        status, _, doc = await referrers(session, proxy, subject.manifest_digest)
        assert status == 200
        assert len(doc["manifests"]) == count, name
        assert upstream_referrers(fake) - before == pages, name


async def test_descriptors_with_hostile_strings_are_dropped(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject = make_image(seed=44)
    fake.add_image(REPO, subject, tag="v1")
    entries = [
        desc(1, artifactType=SIGNATURE_TYPE),
        desc(2, artifactType="application/x\r\nSet-Cookie: session=stolen"),
        desc(3, artifactType="<img src=x onerror=alert(1)>"),
        desc(4, artifactType="a" * 100_000),
        desc(5, artifactType=None),  # JSON null: as if absent, as Go's decoder reads it
        desc(6, annotations={"k": ["not", "a", "string"]}),
        desc(7, digest="sha256:../../../etc/passwd"),
        desc(8, mediaType="text/html"),
        desc(9, size=10**20),
        desc(10, artifactType="application/vnd.ok+json", annotations={"note": "<b>fine as text</b>"}),
    ]
    fake.referrers_hook = answering(lambda r: web.Response(body=index_of(entries), content_type=OCI_INDEX))
    proxy = await start_proxy({"docker.io": fake.url})
    await pull(session, proxy, "v1")
    status, headers, doc = await referrers(session, proxy, subject.manifest_digest)
    assert status == 200
    assert doc["manifests"] == [entries[0], desc(5), entries[9]]
    assert "Set-Cookie" not in headers


async def test_a_filter_upstream_claims_but_did_not_apply_is_applied_here(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    subject = make_image(seed=45)
    fake.add_image(REPO, subject, tag="v1")
    other = "application/vnd.other+json"
    entries = [desc(i, artifactType=SIGNATURE_TYPE if i % 2 else other) for i in range(1, 9)]
    # Claims to filter, never does; and has more than the bound, so a filtered request is made.
    fake.referrers_hook = answering(
        lambda r: web.Response(
            body=index_of(entries), content_type=OCI_INDEX, headers={"OCI-Filters-Applied": "artifactType"}
        )
    )
    proxy = await start_proxy({"docker.io": fake.url}, referrers_max=3)
    await pull(session, proxy, "v1")
    _, headers, doc = await referrers(
        session, proxy, subject.manifest_digest, query={"artifactType": SIGNATURE_TYPE}
    )
    assert headers["OCI-Filters-Applied"] == "artifactType"
    assert {d["artifactType"] for d in doc["manifests"]} == {SIGNATURE_TYPE}
    assert [s.query.get("artifactType") for s in fake.seen if "/referrers/" in s.path] == [
        None,
        SIGNATURE_TYPE,
    ]


async def test_a_fallback_tag_that_is_not_an_index_means_no_referrers(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.referrers_mode = "404"
    subjects = [make_image(seed=46 + i) for i in range(3)]
    for i, s in enumerate(subjects):
        fake.add_image(REPO, s, tag=f"s{i}")
    # An image manifest, a Docker manifest list, and an index of hostile entries at the tags.
    imposter = make_image(seed=50)
    fake.add_image(REPO, imposter, tag=fallback_tag(subjects[0].manifest_digest))
    listing = make_index([make_image(seed=51)], flavour="docker")
    fake.add_manifest(REPO, listing.manifest, DOCKER_LIST, tag=fallback_tag(subjects[1].manifest_digest))
    sig = make_referrer(subjects[2], SIGNATURE_TYPE, b"sig")
    hostile = index_of([desc(1, artifactType="x\r\ny"), referrer_descriptor(sig), desc(2, size=-5)])
    fake.add_manifest(REPO, hostile, OCI_INDEX, tag=fallback_tag(subjects[2].manifest_digest))
    proxy = await start_proxy({"docker.io": fake.url})
    for i in range(len(subjects)):
        await pull(session, proxy, f"s{i}")
    for s, expect in zip(subjects, ([], [], [referrer_descriptor(sig)]), strict=True):
        status, _, doc = await referrers(session, proxy, s.manifest_digest)
        assert (status, doc["manifests"]) == (200, expect)


async def test_a_sha512_subject_uses_the_truncated_fallback_tag(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    fake.referrers_mode = "405"
    digest = "sha512:" + "ab" * 64
    proxy = await start_proxy({"docker.io": fake.url})
    status, _, doc = await referrers(session, proxy, digest)
    assert (status, doc["manifests"]) == (200, [])
    assert fake.count(path_contains="/referrers/" + digest) == 1
    assert fake.count(path_contains="/manifests/sha512-" + "ab" * 32) == 1


async def test_a_404_for_a_repository_upstream_does_not_hold_is_not_taken_as_no_api(
    start_proxy: StartProxy, fake: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    # A registry with the API may answer 404 NAME_UNKNOWN for a repository it does not have:
    # one client asking there must not turn the API off for everyone else for an hour.
    subject, sig, sbom = attach(fake, seed=52)

    def unknown_repository(request: web.Request, name: str, digest: str) -> web.StreamResponse | None:
        if name != "library/nope":
            return None
        body = {"errors": [{"code": "NAME_UNKNOWN", "message": "repository name not known", "detail": None}]}
        return web.json_response(body, status=404)

    fake.referrers_hook = unknown_repository
    proxy = await start_proxy({"docker.io": fake.url})
    status, _, doc = await referrers(session, proxy, subject.manifest_digest, repo="library/nope")
    assert (status, doc["manifests"]) == (200, [])
    await pull(session, proxy, "v1")
    _, _, doc = await referrers(session, proxy, subject.manifest_digest)
    assert listed(doc) == [sig.manifest_digest, sbom.manifest_digest]
