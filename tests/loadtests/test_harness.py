"""``python -m loadtests --quick``: every scenario runs end to end at tiny sizes and the run
writes its table as markdown, JSON and a PNG chart, with every ratio computed from baselines
measured in the same run. One test per scenario, each well under a minute; no timing is judged
(a quick run's figures mean nothing)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from loadtests.__main__ import main
from loadtests.placement import NAMES
from loadtests.scenarios import ALL

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pair_ratio(samples: list[dict[str, Any]], row: dict[str, Any]) -> float | None:
    """The row's ratio again, from the run's own samples: same scenario, metric, client and
    placement; the subject's case, and the baseline's (named "server, case" when it differs)."""
    baseline, _, baseline_case = row["baseline"].partition(", ")

    def values(server: str, case: str) -> dict[int, float]:
        return {
            s["round"]: s["value"]
            for s in samples
            if (s["scenario"], s["case"], s["server"], s["metric"], s["client"], s["placement"])
            == (row["scenario"], case, server, row["metric"], row["client"], row["placement"])
        }

    mine, theirs = values(row["subject"], row["case"]), values(baseline, baseline_case or row["case"])
    ratios = [v / theirs[r] for r, v in mine.items() if theirs.get(r, 0) > 0]
    return statistics.median(ratios) if ratios else None


@pytest.mark.parametrize("scenario", [s.name for s in ALL])
def test_quick_run_writes_table_json_and_chart_from_one_run(tmp_path: Path, scenario: str) -> None:
    out = tmp_path / "out"
    code = main(["--quick", "--only", scenario, "--out", str(out), "--workdir", str(tmp_path / "work")])

    data = json.loads((out / "results.json").read_text())
    assert [(o["name"], o["status"]) for o in data["outcomes"]] == [(scenario, "ok")], data["outcomes"]
    assert code == 0
    assert data["quick"] is True
    assert set(data["placements"]) == set(NAMES)
    rows, samples = data["rows"], data["samples"]
    assert rows and samples
    for row in rows:
        assert row["scenario"] == scenario
        assert row["client"] and row["placement"] in NAMES, row
        assert row["ratio"] is not None, row
        assert row["ratio"] == pytest.approx(_pair_ratio(samples, row)), row
    for s in samples:
        assert s["client"] and s["placement"] in NAMES, s
        assert s.get("extra", {}).get("bad", 0) == 0, s
    text = (out / "results.md").read_text()
    assert "| scenario | case | metric | server |" in text
    assert text.count(f"| {scenario} |") >= len(rows)
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_unknown_scenarios_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--only", "no-such-scenario", "--out", str(tmp_path)])


def test_list_names_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    shown = capsys.readouterr().out
    for sc in ALL:
        assert sc.name in shown


def test_a_run_past_its_deadline_skips_what_is_left_and_says_so(tmp_path: Path) -> None:
    # Less than a scenario's minimum is left from the start: nothing is started, all is reported.
    code = main(["--quick", "--deadline", "10", "--out", str(tmp_path), "--workdir", str(tmp_path / "work")])
    data = json.loads((tmp_path / "results.json").read_text())
    assert code == 1
    assert {o["status"] for o in data["outcomes"]} == {"skipped"}
    assert [o["name"] for o in data["outcomes"]] == [s.name for s in ALL if s.default]
    assert data["rows"] == [] and data["samples"] == []
