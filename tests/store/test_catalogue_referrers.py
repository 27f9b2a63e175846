"""The catalogue's referrers: the subject index of the manifests it holds, in step with what
is indexed and dropped and across a restart; and upstream's stored answers, kept only for a
subject it holds and gone with that subject, also when it went while the cache was stopped."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from proxy.core.mediatypes import OCI_MANIFEST, describe, manifest_type
from proxy.core.reference import Digest
from proxy.core.referrers import Descriptor
from proxy.store.catalogue import Catalogue, ManifestInfo, ReferrersAnswer
from proxy.store.storage import Storage
from tests.support.images import SBOM_TYPE, SIGNATURE_TYPE, Image, make_image, make_referrer


async def hold(catalogue: Catalogue, image: Image) -> None:
    """Store a manifest the way ManifestStore.keep does: rows, file, index."""
    info = ManifestInfo.of(manifest_type(image.manifest), len(image.manifest), describe(image.manifest))
    assert await catalogue.persist_manifest(image.manifest_digest, info)
    catalogue.storage.put_bytes(Digest.parse(image.manifest_digest), image.manifest)
    catalogue.index_manifest(image.manifest_digest, info)


def referrers_rows(root: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(root / "index.db")
    try:
        return list(conn.execute("SELECT upstream, repository, subject, api FROM referrers"))
    finally:
        conn.close()


async def opened(root: Path) -> Catalogue:
    storage = Storage(root)
    storage.prepare()
    catalogue = Catalogue(storage)
    await catalogue.open()
    return catalogue


async def test_the_subject_index_follows_what_is_held_and_survives_a_restart(tmp_path: Path) -> None:
    subject = make_image(seed=1)
    sig = make_referrer(subject, SIGNATURE_TYPE, b"sig")
    sbom = make_referrer(subject, SBOM_TYPE, b"sbom")
    catalogue = await opened(tmp_path)
    for image in (subject, sig, sbom):
        await hold(catalogue, image)
    assert catalogue.referrers_of == {subject.manifest_digest: {sig.manifest_digest, sbom.manifest_digest}}
    catalogue.drop(sig.manifest_digest)
    assert catalogue.referrers_of == {subject.manifest_digest: {sbom.manifest_digest}}
    await catalogue.close()
    again = await opened(tmp_path)
    assert again.referrers_of == {subject.manifest_digest: {sbom.manifest_digest}}
    again.drop(sbom.manifest_digest)
    assert again.referrers_of == {}
    await again.close()


async def test_a_stored_answer_is_kept_for_a_held_subject_and_goes_with_it(tmp_path: Path) -> None:
    subject, stranger = make_image(seed=2), make_image(seed=3)
    catalogue = await opened(tmp_path)
    await hold(catalogue, subject)
    listed = (Descriptor(OCI_MANIFEST, "sha256:" + "1" * 64, 10, SIGNATURE_TYPE, (("k", "v"),)),)
    key = ("docker.io", "library/app", subject.manifest_digest)
    assert await catalogue.put_referrers_answer(key, ReferrersAnswer(listed, 5.0, True, False))
    # Not for a subject it does not hold: nothing would ever drop that row.
    other = ("docker.io", "library/app", stranger.manifest_digest)
    assert not await catalogue.put_referrers_answer(other, ReferrersAnswer(listed, 5.0, True, False))
    await catalogue.close()
    assert referrers_rows(tmp_path) == [("docker.io", "library/app", subject.manifest_digest, 1)]

    again = await opened(tmp_path)
    stored = await again.referrers_answer(key)
    assert stored is not None
    assert (stored.descriptors, stored.fetched, stored.api, stored.truncated) == (listed, 5.0, True, False)
    assert await again.referrers_answer(other) is None
    again.drop(subject.manifest_digest)
    assert await again.referrers_answer(key) is None
    await again.flushed()
    await again.close()
    assert referrers_rows(tmp_path) == []


async def test_answers_of_a_subject_removed_while_stopped_are_dropped_at_start(tmp_path: Path) -> None:
    subject = make_image(seed=4)
    catalogue = await opened(tmp_path)
    await hold(catalogue, subject)
    key = ("docker.io", "library/app", subject.manifest_digest)
    assert await catalogue.put_referrers_answer(key, ReferrersAnswer((), 1.0, False, False))
    await catalogue.close()
    Storage(tmp_path).remove(Digest.parse(subject.manifest_digest))
    again = await opened(tmp_path)
    assert await again.referrers_answer(key) is None
    await again.close()
    assert referrers_rows(tmp_path) == []
