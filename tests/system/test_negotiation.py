"""Content negotiation against a real registry (Debian's docker-registry, distribution 2.8): a
client gets what upstream would give it for the Accept it sent, whatever other clients sent
before it. A narrow Accept once turned a multi-platform tag into its amd64 manifest for every
client until the tag's TTL ran out."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import StartProxy
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Flavour,
    make_image,
    make_index,
    push_index,
)
from tests.support.registry import Registry

BOTH_DOCKER = f"{DOCKER_MANIFEST}, {DOCKER_LIST}"


async def head_digest(session: aiohttp.ClientSession, url: str, accept: str | None) -> tuple[int, str, str]:
    """Status, Content-Type and Docker-Content-Digest of a GET with this Accept."""
    headers = {} if accept is None else {"Accept": accept}
    async with session.get(url, headers=headers) as resp:
        await resp.read()
        digest = resp.headers.get("Docker-Content-Digest", "")
        return resp.status, resp.headers.get("Content-Type", ""), digest


async def skopeo_inspect(ref: str, *extra: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        "skopeo",
        *extra,
        "inspect",
        "--tls-verify=false",
        ref,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    doc: dict[str, object] = json.loads(out)
    return doc


async def test_a_v2_only_request_does_not_turn_a_manifest_list_into_amd64_for_others(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession
) -> None:
    amd, arm = make_image(seed=51, flavour="docker"), make_image(seed=52, arch="arm64", flavour="docker")
    index = make_index([amd, arm], flavour="docker")
    await push_index(session, registry.url, "library/multi", index, tag="v1")
    proxy = await start_proxy({"docker.io": registry.url}, tag_ttl=3600)
    url = f"{proxy.url}/v2/library/multi/manifests/v1"

    assert await head_digest(session, url, BOTH_DOCKER) == (200, DOCKER_LIST, index.digest)
    # What distribution itself answers a v2-only client: the linux/amd64 manifest.
    assert await head_digest(session, url, DOCKER_MANIFEST) == (200, DOCKER_MANIFEST, amd.manifest_digest)
    # ... which must not become the answer for a client that accepts the list.
    assert await head_digest(session, url, BOTH_DOCKER) == (200, DOCKER_LIST, index.digest)
    # Clients that name no type, or */*, get the most capable type there is.
    assert await head_digest(session, url, None) == (200, DOCKER_LIST, index.digest)
    assert await head_digest(session, url, "*/*") == (200, DOCKER_LIST, index.digest)
    assert await head_digest(session, url, DOCKER_MANIFEST) == (200, DOCKER_MANIFEST, amd.manifest_digest)

    inspected = await skopeo_inspect(f"docker://{proxy.host}/library/multi:v1", "--override-arch", "arm64")
    assert inspected["Architecture"] == "arm64"
    assert inspected["Digest"] == index.digest  # skopeo reports the digest it resolved the tag to


@pytest.mark.parametrize("flavour", ["oci", "docker"])
async def test_each_accept_gets_upstreams_own_answer(
    start_proxy: StartProxy, registry: Registry, session: aiohttp.ClientSession, flavour: Flavour
) -> None:
    amd, arm = make_image(seed=53, flavour=flavour), make_image(seed=54, arch="arm64", flavour=flavour)
    index = make_index([amd, arm], flavour=flavour)
    await push_index(session, registry.url, "library/multi", index, tag="v1")
    upstream_url = f"{registry.url}/v2/library/multi/manifests/v1"
    proxy = await start_proxy({"docker.io": registry.url}, tag_ttl=3600)
    url = f"{proxy.url}/v2/library/multi/manifests/v1"
    accepts = [DOCKER_MANIFEST, OCI_MANIFEST, BOTH_DOCKER, f"{OCI_MANIFEST}, {OCI_INDEX}", MANIFEST_ACCEPT]
    # Twice round, in an order that would let any answer leak into the next Accept's.
    for accept in accepts + accepts[::-1]:
        upstream = await head_digest(session, upstream_url, accept)
        ours = await head_digest(session, url, accept)
        if upstream[0] != 200:
            assert ours[0] == upstream[0], accept
        elif upstream[1] in accept.split(", "):
            assert ours == upstream, accept
        else:
            # distribution converts to schema 1 for a client that accepts no type it has; we
            # never answer a type the client did not name.
            assert ours[0] == 404, accept
