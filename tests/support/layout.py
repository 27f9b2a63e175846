"""Reading what skopeo wrote: an OCI image layout directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support.images import Image


def layout_blobs(layout: Path) -> dict[str, bytes]:
    """Every blob in an OCI layout, each checked against its own file name."""
    found = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name
        found[f"sha256:{path.name}"] = data
    return found


def assert_image_in_layout(layout: Path, image: Image) -> None:
    blobs = layout_blobs(layout)
    for blob in image.blobs:
        assert blobs[blob.digest] == blob.data
