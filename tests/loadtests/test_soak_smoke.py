"""The kill -9 soak (loadtests/soak.py) runs end to end in a few seconds with one restart:
its counts and checks work, and on this short run every invariant holds."""

from __future__ import annotations

from pathlib import Path

from loadtests.soak import Config, run_soak


async def test_a_short_soak_with_one_kill_keeps_every_invariant(tmp_path: Path) -> None:
    report = await run_soak(Config(seconds=5, clients=4, restart_every=3, workdir=tmp_path))
    assert report.restarts == 1
    assert sum(report.answered.values()) > 0 and report.verified_bytes > 0
    assert report.wrong_bodies == 0, report.wrong_examples
    assert report.five_xx_outside == 0, report.five_xx_examples
    assert report.temp_left_after_restarts == 0 and report.temp_left_at_end == 0
    assert report.catalogue_agrees, report.disagreement
    assert report.files > 0 and report.rss_mib
    assert report.ok
    text = report.text()
    assert "bodies accepted as complete that were wrong: 0" in text
    assert "catalogue and disk agree: yes" in text
