"""Prefetch through an Engine in front of the fake upstream: verified like a pull, cached
blobs not fetched again, platforms, bounded concurrency, failures named."""

from __future__ import annotations

from pathlib import Path

from proxy.airgap.prefetch import NoProgress, ReferenceOutcome, complete, prefetch
from proxy.core.imageref import ImageRef
from proxy.core.mediatypes import accept_key
from proxy.core.reference import Digest
from tests.airgap.conftest import OpenEngine, ref
from tests.support.fake_upstream import BlobFaults, FakeUpstream
from tests.support.images import make_image, make_index


class Recorder(NoProgress):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.advanced: dict[str, int] = {}
        self.outcomes: list[ReferenceOutcome] = []

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        self.events.append(("started", digest))

    def blob_advanced(self, digest: str, received: int) -> None:
        self.advanced[digest] = self.advanced.get(digest, 0) + received

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        self.events.append(("fetched" if fetched else "cached", digest))

    def blob_failed(self, digest: str, reason: str) -> None:
        self.events.append(("failed", digest))

    def reference_finished(self, outcome: ReferenceOutcome) -> None:
        self.outcomes.append(outcome)


async def test_an_image_and_an_index_every_platform_then_nothing_fetched_again(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    single = make_image(layer_sizes=(4096, 70_000), seed=1)
    amd, arm = make_image(seed=2), make_image(arch="arm64", seed=3)
    index = make_index([amd, arm])
    fake.add_image("library/single", single, tag="v1")
    for img in (amd, arm):
        fake.add_image("library/multi", img)
    fake.add_manifest("library/multi", index.manifest, index.media_type, tag="v2")
    async with open_engine({"docker.io": fake.url}) as engine:
        refs = [ref(engine, "single:v1"), ref(engine, "docker.io/library/multi:v2")]
        seen = Recorder()
        report = await prefetch(engine, refs, progress=seen)
        assert report.ok, report.failed
        blobs = [*single.blobs, *amd.blobs, *arm.blobs]
        assert report.blobs_fetched == len(blobs) and report.blobs_cached == 0
        assert report.bytes_fetched == sum(b.size for b in blobs)
        assert report.manifests == 4
        assert {d for kind, d in seen.events if kind == "fetched"} == {b.digest for b in blobs}
        assert all(seen.advanced[b.digest] == b.size for b in blobs)
        assert [o.digest for o in report.references] == [single.manifest_digest, index.digest]
        assert report.references[1].platforms == ("linux/amd64", "linux/arm64")
        # Served offline to clients of every kind: the tag's answer is for every media type,
        # and every digest is confirmed for its repository.
        answers = engine.catalogue.answers(("docker.io", "library/multi", "v2"))
        assert answers[accept_key(None)].digest == index.digest
        for d in [index.digest, amd.manifest_digest, *(b.digest for b in arm.blobs)]:
            assert await engine.catalogue.holds("docker.io", "library/multi", d)
        assert all(complete(engine.catalogue, r) for r in refs)
        gets = fake.count(method="GET", path_contains="/blobs/")

        again = await prefetch(engine, refs)
        assert again.ok and again.blobs_fetched == 0 and again.blobs_cached == len(blobs)
        assert fake.count(method="GET", path_contains="/blobs/") == gets


async def test_platform_limits_manifests_and_layers_but_the_index_is_stored_whole(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    amd, arm = make_image(seed=10), make_image(arch="arm64", seed=11)
    index = make_index([amd, arm])
    for img in (amd, arm):
        fake.add_image("library/multi", img)
    fake.add_manifest("library/multi", index.manifest, index.media_type, tag="v1")
    async with open_engine({"docker.io": fake.url}) as engine:
        report = await prefetch(engine, [ref(engine, "multi:v1")], platforms=frozenset({"linux/arm64"}))
        assert report.ok, report.failed
        assert report.references[0].platforms == ("linux/arm64",)
        held = set(engine.catalogue.blobs)
        assert {index.digest, arm.manifest_digest, *(b.digest for b in arm.blobs)} <= held
        assert not {amd.manifest_digest, *(b.digest for b in amd.blobs)} & held
        stored = engine.storage.read_bytes(Digest.parse(index.digest), 1 << 20)
        assert stored == index.manifest
        assert not complete(engine.catalogue, ref(engine, "multi:v1"))

        none = await prefetch(engine, [ref(engine, "multi:v1")], platforms=frozenset({"linux/s390x"}))
        assert not none.ok
        assert "linux/s390x" in str(none.references[0].error)
        assert "linux/amd64" in str(none.references[0].error)


async def test_a_blob_whose_digest_lies_fails_its_reference_and_the_others_still_arrive(
    open_engine: OpenEngine, fake: FakeUpstream, tmp_path: Path
) -> None:
    good = make_image(seed=20)
    bad = make_image(layer_sizes=(4096, 50_000), seed=21)
    fake.add_image("library/good", good, tag="v1")
    fake.add_image("library/bad", bad, tag="v1")
    fake.faults[bad.layers[1].digest] = BlobFaults(corrupt_at=100)
    async with open_engine({"docker.io": fake.url}, blob_retries=0) as engine:
        refs = [ref(engine, "bad:v1"), ref(engine, "good:v1"), ref(engine, "missing:v1")]
        seen = Recorder()
        report = await prefetch(engine, refs, progress=seen)
        assert [o.ok for o in report.references] == [False, True, False]
        assert "does not match its digest" in str(report.references[0].error)
        assert "MANIFEST_UNKNOWN" in str(report.references[2].error)
        assert ("failed", bad.layers[1].digest) in seen.events
        # The rest of the bad image's blobs are cached; the lying one is not, and no temp file.
        assert bad.layers[0].digest in engine.catalogue.blobs
        assert bad.layers[1].digest not in engine.catalogue.blobs
        assert all(b.digest in engine.catalogue.blobs for b in good.blobs)
        assert not list(engine.storage.tmp.iterdir())
        assert len(seen.outcomes) == 3


async def test_a_layer_shared_by_two_references_is_fetched_once_and_confirmed_for_both(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    image = make_image(seed=30)
    fake.add_image("library/one", image, tag="v1")
    fake.add_image("library/two", image, tag="v1")
    async with open_engine({"docker.io": fake.url}) as engine:
        report = await prefetch(engine, [ref(engine, "one:v1"), ref(engine, "two:v1")])
        assert report.ok
        assert report.blobs_fetched == len(image.blobs)
        for blob in image.blobs:
            assert fake.count(method="GET", path_contains=f"/blobs/{blob.digest}") == 1
            for repo in ("library/one", "library/two"):
                assert await engine.catalogue.holds("docker.io", repo, blob.digest)


async def test_at_most_concurrency_blobs_download_at_once(
    open_engine: OpenEngine, fake: FakeUpstream
) -> None:
    image = make_image(layer_sizes=(1000, 2000, 3000, 4000, 5000), seed=40)
    fake.add_image("library/app", image, tag="v1")
    async with open_engine({"docker.io": fake.url}) as engine:
        running: list[int] = []

        class Peak(NoProgress):
            now = 0

            def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
                self.now += 1
                running.append(self.now)

            def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
                self.now -= 1

        report = await prefetch(engine, [ref(engine, "app:v1")], progress=Peak(), concurrency=2)
        assert report.ok and report.blobs_fetched == 6
        assert max(running) <= 2
