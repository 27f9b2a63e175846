"""Rows compare a subject with the baseline measured next to it: the ratio is the median over
rounds of same-round ratios, under the same client and placement, and targets are judged on it."""

from __future__ import annotations

import json

import pytest

from loadtests.report import Report, Row, Sample, at_least, at_most, compare, markdown_table


def sample(server: str, value: float, rnd: int, *, case: str = "whole", client: str = "wrk -t2 -c8",
           placement: str = "unpinned", others: float = 0.0) -> Sample:  # fmt: skip
    return Sample("warm", case, server, "GB/s", value, rnd, client, placement, {"others": others})


def test_ratio_is_the_median_of_same_round_ratios() -> None:
    # The baseline drifts between rounds; each round's subject is compared with that round's.
    samples = [
        sample("nginx", 2.0, 1), sample("ocicache", 1.0, 1),  # 0.5
        sample("nginx", 4.0, 2), sample("ocicache", 4.0, 2),  # 1.0
        sample("nginx", 1.0, 3), sample("ocicache", 0.8, 3),  # 0.8
    ]  # fmt: skip
    row = compare(
        samples,
        scenario="warm",
        case="whole",
        metric="GB/s",
        better="higher",
        subject="ocicache",
        baseline="nginx",
        client="wrk -t2 -c8",
        placement="unpinned",
    )
    assert row is not None
    assert row.ratio == pytest.approx(0.8)
    assert row.rounds == 3
    assert row.value == pytest.approx(1.0) and row.baseline_value == pytest.approx(2.0)


def test_other_clients_placements_and_unpaired_rounds_are_left_out() -> None:
    samples = [
        sample("nginx", 2.0, 1), sample("ocicache", 3.0, 1),
        sample("nginx", 9.0, 1, client="sink -c8"),
        sample("nginx", 9.0, 1, placement="split"),
        sample("ocicache", 9.0, 2),  # no baseline in round 2
    ]  # fmt: skip
    row = compare(
        samples,
        scenario="warm",
        case="whole",
        metric="GB/s",
        better="higher",
        subject="ocicache",
        baseline="nginx",
        client="wrk -t2 -c8",
        placement="unpinned",
    )
    assert row is not None
    assert row.ratio == pytest.approx(1.5)
    assert row.rounds == 1


def test_no_baseline_gives_no_ratio_and_no_subject_no_row() -> None:
    samples = [sample("ocicache", 3.0, 1)]

    def row_of(subject: str, baseline: str) -> Row | None:
        return compare(
            samples,
            scenario="warm",
            case="whole",
            metric="GB/s",
            better="higher",
            subject=subject,
            baseline=baseline,
            client="wrk -t2 -c8",
            placement="unpinned",
            targets=[at_least(1.0)],
        )

    row = row_of("ocicache", "nginx")
    assert row is not None and row.ratio is None and row.met is None
    assert row_of("nginx", "ocicache") is None


def test_targets_on_ratio_and_on_value_and_the_advantage_of_lower_is_better() -> None:
    samples = [
        Sample("image", "copy", "ocicache", "s", 1.2, 1, "skopeo copy", "unpinned"),
        Sample("image", "copy", "direct", "s", 1.0, 1, "skopeo copy", "unpinned"),
    ]
    row = compare(
        samples,
        scenario="image",
        case="copy",
        metric="s",
        better="lower",
        subject="ocicache",
        baseline="direct",
        client="skopeo copy",
        placement="unpinned",
        targets=[at_most(1.1), at_most(2.0, on="value")],
    )
    assert row is not None
    assert [c.met for c in row.checks] == [False, True]
    assert row.met is False
    assert row.advantage == pytest.approx(1 / 1.2)
    assert [c.target for c in row.checks] == ["ratio ≤ 1.1", "s ≤ 2"]


def test_a_baseline_may_be_another_case_of_the_same_server() -> None:
    samples = [
        Sample("fan", "20 clients", "ocicache", "s", 2.2, 1, "aiohttp", "unpinned"),
        Sample("fan", "1 client", "ocicache", "s", 2.0, 1, "aiohttp", "unpinned"),
    ]
    row = compare(
        samples,
        scenario="fan",
        case="20 clients",
        metric="s",
        better="lower",
        subject="ocicache",
        baseline="ocicache",
        baseline_case="1 client",
        client="aiohttp",
        placement="unpinned",
    )
    assert row is not None
    assert row.ratio == pytest.approx(1.1)
    assert row.baseline == "ocicache, 1 client"


def test_the_table_names_client_placement_and_disturbance_and_json_holds_everything() -> None:
    samples = [sample("nginx", 2.0, 1, others=0.4), sample("ocicache", 1.0, 1)]
    row = compare(
        samples,
        scenario="warm",
        case="whole",
        metric="GB/s",
        better="higher",
        subject="ocicache",
        baseline="nginx",
        client="wrk -t2 -c8",
        placement="unpinned",
    )
    assert row is not None
    assert row.disturbance == pytest.approx(0.4)
    table = markdown_table([row])
    assert "| warm | whole | GB/s ↑ | ocicache | 1.00 | nginx | 2.00 | 0.50x |" in table
    assert "| wrk -t2 -c8 | unpinned | 0.40 |" in table
    report = Report("now", False, {"cpus": "2"}, {"unpinned": "any CPU"}, rows=[row], samples=samples)
    data = json.loads(json.dumps(report.to_json()))
    assert data["rows"][0]["ratio"] == pytest.approx(0.5)
    assert data["rows"][0]["advantage"] == pytest.approx(0.5)
    assert len(data["samples"]) == 2
    assert "disturbed by other load" in report.markdown()
