"""ocicache verify: rehash the cache, remove what no longer matches its digest."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from proxy.core.reference import Digest
from proxy.store.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


def put(storage: Storage, data: bytes) -> Digest:
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    storage.put_bytes(digest, data)
    return digest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "verify", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_verify_removes_rotten_blobs_and_keeps_good_ones(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    storage.prepare()
    good = put(storage, b"good bytes" * 100_000)
    rotten = put(storage, b"bytes that will rot" * 100_000)
    path = storage.blob_path(rotten)
    data = bytearray(path.read_bytes())
    data[12345] ^= 0xFF
    path.write_bytes(bytes(data))

    kept = run("--cache-dir", str(tmp_path), "--keep")
    assert kept.returncode == 1
    assert f"bad: {rotten}" in kept.stdout
    assert path.exists()

    result = run("--cache-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"bad: {rotten} (removed)" in result.stdout
    assert "checked 2 blobs" in result.stdout
    assert not path.exists()
    assert storage.blob_path(good).exists()

    again = run("--cache-dir", str(tmp_path))
    assert again.returncode == 0
    assert "checked 1 blobs" in again.stdout and "0 bad" in again.stdout


def test_verify_without_a_cache_is_an_error(tmp_path: Path) -> None:
    result = run("--cache-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "no cache" in result.stderr
