"""The scenarios, in the order the harness runs them.

A scenario is a module with a docstring saying what it measures and a ``SCENARIO``
(:class:`loadtests.harness.Scenario`). To add one (parallel ranged fills behind the
per-connection relay, the first byte of a lazy range, ``--workers``), write its module beside
these and add it to ``ALL``; one made for a closer look at one question, outside the default
run, says ``default=False``.
"""

from __future__ import annotations

from typing import Final

from loadtests.harness import Scenario
from loadtests.scenarios import (
    catalogue,
    cold_fanout,
    lazy_range,
    manifest,
    memory,
    parallel_fill,
    warm_blob,
    warm_placement,
    whole_image,
)

# Default ones run unless --only names others; the rest (default=False) only when named.
ALL: Final[tuple[Scenario, ...]] = (
    warm_blob.SCENARIO,
    manifest.SCENARIO,
    whole_image.SCENARIO,
    cold_fanout.SCENARIO,
    parallel_fill.SCENARIO,
    lazy_range.SCENARIO,
    memory.SCENARIO,
    catalogue.SCENARIO,
    warm_placement.SCENARIO,
)
