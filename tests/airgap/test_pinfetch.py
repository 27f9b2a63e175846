"""serve fetches the pins the cache lacks, in the background, when online."""

from __future__ import annotations

from pathlib import Path

from proxy.web import keys
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import make_image, make_index


async def test_serve_fetches_missing_pins_at_start_and_not_again(
    start_proxy: StartProxy, fake: FakeUpstream, tmp_path: Path
) -> None:
    image = make_image(seed=71)
    amd, arm = make_image(seed=72), make_image(arch="arm64", seed=73)
    index = make_index([amd, arm])
    fake.add_image("library/app", image, tag="v1")
    for img in (amd, arm):
        fake.add_image("library/multi", img)
    fake.add_manifest("library/multi", index.manifest, index.media_type)
    pins = ("docker.io/library/app:v1", f"multi@{index.digest}", "quay.io/not/configured:1")
    cache = tmp_path / "cache"
    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=cache, pins=pins)
    report = await proxy.app[keys.PINS_FETCH]
    assert report is not None and report.ok
    assert report.blobs_fetched == len(image.blobs) + len(amd.blobs) + len(arm.blobs)
    held = await proxy.cached()
    assert {b.digest for b in (*image.blobs, *amd.blobs, *arm.blobs)} <= held
    await proxy.server.close()

    gets = len(fake.seen)
    again = await start_proxy({"docker.io": fake.url}, cache_dir=cache, pins=pins)
    assert await again.app[keys.PINS_FETCH] is None  # complete: nothing to do
    await again.server.close()
    offline = await start_proxy(
        {"docker.io": fake.url}, cache_dir=tmp_path / "other", pins=pins, offline=True
    )
    assert await offline.app[keys.PINS_FETCH] is None
    assert len(fake.seen) == gets
