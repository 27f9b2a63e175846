"""``--with-referrers`` as a user runs it: prefetch and export bring a signed image's referrers,
import restores them, and an offline proxy on the imported cache answers the referrers API."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.airgap.test_referrers import REPO, Signed
from tests.cli.test_airgap_commands import cli, where
from tests.conftest import StartProxy
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import referrer_descriptor


async def test_prefetch_export_import_with_referrers_then_offline(
    fake: FakeUpstream, start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    signed = Signed(fake)
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    code, out, err = await cli("prefetch", "--with-referrers", "multi:v1", *where(cache, fake))
    assert code == 0, err
    assert "(2 of them referrers)" in out.splitlines()[-1]
    plain, signed_archive = tmp_path / "plain.tar", tmp_path / "signed.tar.zst"
    code, out, err = await cli("export", "--offline", "-o", str(plain), "multi:v1", *where(cache, fake))
    assert code == 0, err
    code, out, err = await cli(
        "export", "--offline", "--with-referrers", "-o", str(signed_archive), "multi:v1", *where(cache, fake)
    )
    assert code == 0, err
    code, out, err = await cli("import", str(plain), *where(fresh, fake))
    assert code == 0, err
    assert "referrers" not in out.splitlines()[-1]  # without the flag, none are carried
    code, out, err = await cli("import", str(signed_archive), *where(fresh, fake))
    assert code == 0, err
    for referrer in signed.carried():
        assert f"served docker.io/{REPO}@{referrer.manifest_digest}: a referrer of" in out
    assert "(1 served, 2 referrers)" in out.splitlines()[-1]

    proxy = await start_proxy({"docker.io": fake.url}, cache_dir=fresh, offline=True)
    async with session.get(f"{proxy.url}/v2/{REPO}/referrers/{signed.index.digest}") as resp:
        assert resp.status == 200
        assert json.loads(await resp.read())["manifests"] == [referrer_descriptor(signed.sig)]
