"""Shared records: newer tag answers win, tokens keep their expiry, 404s are brief, locations."""

from __future__ import annotations

from proxy.cluster.keys import negative_key
from proxy.cluster.records import Records
from proxy.cluster.redisstate import RedisState
from proxy.store.catalogue import TagAnswer

D1, D2 = "sha256:" + "11" * 32, "sha256:" + "22" * 32
OCI = "application/vnd.oci.image.index.v1+json"


async def test_tag_answers_newer_wins_per_accept_key(state: RedisState) -> None:
    records = Records(state, negative_ttl=10)
    await records.put_answers("docker.io", "library/a", "v1", {"k1": TagAnswer(D1, OCI, 100.0)})
    await records.put_answers("docker.io", "library/a", "v1", {"k1": TagAnswer(D2, OCI, 50.0)})  # older
    await records.put_answers("docker.io", "library/a", "v1", {"k2": TagAnswer(D2, OCI, 60.0)})
    assert await records.answers("docker.io", "library/a", "v1") == {
        "k1": TagAnswer(D1, OCI, 100.0),
        "k2": TagAnswer(D2, OCI, 60.0),
    }
    await records.put_answers("docker.io", "library/a", "v1", {"k1": TagAnswer(D2, OCI, 200.0)})
    assert (await records.answers("docker.io", "library/a", "v1"))["k1"].digest == D2
    assert await records.answers("docker.io", "library/a", "v2") == {}


async def test_manifests_tokens_negatives_and_locations(state: RedisState) -> None:
    records = Records(state, negative_ttl=0.2)
    await records.put_manifest(D1, b"{}", OCI)
    assert await records.manifest(D1) == (b"{}", OCI)
    assert await records.manifest(D2) is None

    await records.put_token("docker.io", "who", "repository:a:pull", "tok", 300)
    found = await records.token("docker.io", "who", "repository:a:pull")
    assert found is not None and found[0] == "tok" and 290 < found[1] <= 300
    assert await records.token("docker.io", "someone-else", "repository:a:pull") is None

    await records.put_absent("docker.io", "library/a", "v9")
    assert await records.absent("docker.io", "library/a", "v9")
    assert not await records.absent("docker.io", "library/b", "v9")
    # ...briefly: it expires by itself.
    assert 0 < await state.client.pttl(negative_key("docker.io", "library/a", "v9")) <= 200

    await records.add_location(D1, "http://127.0.0.1:1")
    await records.add_location(D1, "http://127.0.0.1:2")
    await records.remove_location(D1, "http://127.0.0.1:1")
    assert await records.locations(D1) == ["http://127.0.0.1:2"]
