"""A hostile index lists the same manifest many times (under different platforms), nested:
every command reads each manifest once, however often it is listed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.airgap import exporter, importer, prefetch
from proxy.airgap.importer import import_layout
from tests.airgap.conftest import OpenEngine, ref
from tests.airgap.layouts import Layout, sha256, tar_bytes
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import OCI_INDEX, make_image

FAN = 30  # entries per index; three levels deep make 27,000 paths to the same image


def bomb() -> tuple[list[tuple[str, bytes]], Any]:
    image = make_image(seed=91)
    body, media_type = image.manifest, image.media_type
    levels = []
    for _ in range(3):
        entries = [
            {
                "mediaType": media_type,
                "digest": sha256(body),
                "size": len(body),
                "platform": {"os": "linux", "architecture": f"arch{i}"},
            }
            for i in range(FAN)
        ]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        media_type = OCI_INDEX
        levels.append(body)
    return [(sha256(b), b) for b in levels], image


def counting(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    calls = [0]
    real = module.children

    def counted(body: bytes) -> Any:
        calls[0] += 1
        return real(body)

    monkeypatch.setattr(module, "children", counted)
    return calls


async def test_import_reads_each_manifest_once(
    open_engine: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels, image = bomb()
    layout = Layout()
    layout.add_image(image, None)
    for digest, body in levels:
        layout.blobs[digest] = body
    from proxy.airgap.graph import Descriptor

    top = levels[-1]
    layout.refs.append((Descriptor(top[0], OCI_INDEX, len(top[1])), "docker.io/library/bomb:v1"))
    path = tmp_path / "bomb.tar"
    path.write_bytes(tar_bytes(layout.members()))
    calls = counting(monkeypatch, importer)
    async with open_engine({"docker.io": "http://127.0.0.1:9"}) as engine:
        report = await import_layout(engine, path)
        assert report.references[0].served
    assert calls[0] == 4


async def test_prefetch_and_export_walk_each_manifest_once(
    open_engine: OpenEngine, fake: FakeUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels, image = bomb()
    fake.add_image("library/bomb", image)
    for i, (_, body) in enumerate(levels):
        fake.add_manifest("library/bomb", body, OCI_INDEX, tag="v1" if i == len(levels) - 1 else None)
    fetched = counting(monkeypatch, prefetch)
    exported = counting(monkeypatch, exporter)
    async with open_engine({"docker.io": fake.url}) as engine:
        refs = [ref(engine, "bomb:v1")]
        report = await prefetch.prefetch(engine, refs)
        assert report.ok, report.failed
        assert fetched[0] == 4
        await exporter.export(engine, refs, tmp_path / "bomb.tar")
        assert exported[0] == 4
