"""Engines on a cache directory in front of the fake upstream, for the air-gap tests."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from proxy.core.imageref import ImageRef, parse_image_reference
from proxy.flows.engine import Engine, running
from tests.conftest import make_settings

OpenEngine = Callable[..., AbstractAsyncContextManager[Engine]]


@pytest.fixture
def open_engine(tmp_path: Path) -> OpenEngine:
    def open_(upstreams: dict[str, str], cache_dir: Path | None = None, **overrides: Any) -> Any:
        settings = make_settings(cache_dir or tmp_path / "cache", upstreams, **overrides)
        return running(settings)

    return open_


def ref(engine: Engine, text: str) -> ImageRef:
    names = [u.name for u in engine.settings.upstreams]
    return parse_image_reference(text, names, names[0])
