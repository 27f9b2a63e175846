"""The report: samples measured in one run, the ratios between them, and how they are shown.

A :class:`Sample` is one measurement: a server, a case (what was asked of it), a metric, a round,
and the client, CPU placement and machine load it was measured under. A :class:`Row` compares a
subject with a baseline measured in the same run, under the same client and placement: its
ratio is the median, over rounds, of the subject's value over the baseline's value in the same
round, because this machine's speed drifts by tens of percent from one minute to the next and a
server is best compared with the baseline measured next to it. Targets (from the issues) are
checked on a row's ratio or on its value.

The report renders as one markdown table, and as JSON holding every row and every sample.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

Better = Literal["higher", "lower"]
# Cores used by other processes (and stolen by the hypervisor) beyond which a figure is marked.
NOISY: Final = 0.05


@dataclass(frozen=True)
class Sample:
    scenario: str
    case: str  # what was asked, e.g. "whole blob" or "manifest by tag"
    server: str
    metric: str  # "GB/s", "requests/s", "p99 ms", "s", "MiB", "x blob"
    value: float
    round: int
    client: str  # the client as it ran, e.g. "wrk -t2 -c8"
    placement: str
    # Cores during the measurement: server, client, machine_busy, steal, others.
    load: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def disturbance(self) -> float:
        """Cores taken by anything outside the harness: other processes and the hypervisor."""
        return self.load.get("others", 0.0) + self.load.get("steal", 0.0)


@dataclass(frozen=True)
class Target:
    on: Literal["ratio", "value"]
    op: Literal[">=", "<="]
    bound: float

    def met(self, value: float, ratio: float | None) -> bool | None:
        x = ratio if self.on == "ratio" else value
        if x is None:
            return None
        return x >= self.bound if self.op == ">=" else x <= self.bound

    def text(self, metric: str) -> str:
        sign = "≥" if self.op == ">=" else "≤"
        if self.on == "ratio":
            return f"ratio {sign} {self.bound:g}"
        return f"{metric} {sign} {self.bound:,g}"


def at_least(bound: float, on: Literal["ratio", "value"] = "ratio") -> Target:
    return Target(on, ">=", bound)


def at_most(bound: float, on: Literal["ratio", "value"] = "ratio") -> Target:
    return Target(on, "<=", bound)


@dataclass(frozen=True)
class Check:
    target: str  # as shown, e.g. "ratio ≥ 1"
    met: bool | None
    on: Literal["ratio", "value"]
    bound: float


@dataclass(frozen=True)
class Row:
    scenario: str
    case: str
    metric: str
    better: Better
    subject: str
    value: float  # median of the subject's samples
    baseline: str
    baseline_value: float
    ratio: float | None  # median over rounds of subject / baseline in the same round
    rounds: int  # rounds in which both were measured
    client: str
    placement: str
    disturbance: float  # the most cores any of its samples saw taken by others
    checks: tuple[Check, ...] = ()
    note: str = ""

    @property
    def advantage(self) -> float | None:
        """How many times better the subject did than the baseline (> 1: better)."""
        if self.ratio is None or self.ratio <= 0:
            return None
        return self.ratio if self.better == "higher" else 1 / self.ratio

    @property
    def met(self) -> bool | None:
        """All targets met (True), one missed (False), or none to judge (None)."""
        verdicts = [c.met for c in self.checks if c.met is not None]
        return None if not verdicts else all(verdicts)


def _select(
    samples: Iterable[Sample], scenario: str, case: str, server: str, metric: str, client: str, placement: str
) -> list[Sample]:
    return [
        s
        for s in samples
        if (s.scenario, s.case, s.server, s.metric, s.client, s.placement)
        == (scenario, case, server, metric, client, placement)
    ]


def compare(
    samples: Sequence[Sample],
    *,
    scenario: str,
    case: str,
    metric: str,
    better: Better,
    subject: str,
    baseline: str,
    client: str,
    placement: str,
    baseline_case: str | None = None,
    targets: Sequence[Target] = (),
    note: str = "",
) -> Row | None:
    """The row comparing ``subject`` with ``baseline`` (measured as ``baseline_case``, by default
    the same case); None if the subject was not measured."""
    mine = _select(samples, scenario, case, subject, metric, client, placement)
    theirs = _select(samples, scenario, baseline_case or case, baseline, metric, client, placement)
    if not mine:
        return None
    by_round = {s.round: s.value for s in theirs}
    ratios = [s.value / by_round[s.round] for s in mine if by_round.get(s.round, 0) > 0]
    value = statistics.median(s.value for s in mine)
    base = statistics.median(s.value for s in theirs) if theirs else float("nan")
    ratio = statistics.median(ratios) if ratios else None
    checks = tuple(Check(t.text(metric), t.met(value, ratio), t.on, t.bound) for t in targets)
    shown_baseline = baseline if baseline_case in (None, case) else f"{baseline}, {baseline_case}"
    return Row(
        scenario,
        case,
        metric,
        better,
        subject,
        value,
        shown_baseline,
        base,
        ratio,
        len(ratios),
        client,
        placement,
        max(s.disturbance for s in [*mine, *theirs]),
        checks,
        note,
    )


# --- rendering ---------------------------------------------------------------------------------


def format_value(value: float, metric: str) -> str:
    if value != value:  # NaN: not measured
        return "–"
    if metric == "requests/s":
        return f"{value:,.0f}"
    if metric in ("MiB",):
        return f"{value:.1f}"
    return f"{value:.2f}"


def _verdict(row: Row) -> str:
    if row.met is None:
        return ""
    return "yes" if row.met else "**no**"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | case | metric | server | value | baseline | baseline value | ratio | target | met "
        "| client | placement | others (cores) |",
        "| --- | --- | --- | --- | --: | --- | --: | --: | --- | --- | --- | --- | --: |",
    ]
    for r in rows:
        arrow = "↑" if r.better == "higher" else "↓"
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}x"
        targets = "; ".join(c.target for c in r.checks)
        value = format_value(r.value, r.metric)
        lines.append(
            f"| {r.scenario} | {r.case} | {r.metric} {arrow} | {r.subject} | {value} "
            f"| {r.baseline} | {format_value(r.baseline_value, r.metric)} | {ratio} | {targets} "
            f"| {_verdict(r)} | {r.client} | {r.placement} | {r.disturbance:.2f} |"
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Outcome:
    """How one scenario's run went."""

    name: str
    title: str
    status: Literal["ok", "failed", "skipped"]
    seconds: float
    error: str = ""


@dataclass
class Report:
    started: str
    quick: bool
    machine: dict[str, str]
    placements: dict[str, str]  # name -> description
    servers: dict[str, str] = field(default_factory=dict)  # name -> how it ran
    clients: dict[str, str] = field(default_factory=dict)  # name -> what it is
    rows: list[Row] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.status == "ok" for o in self.outcomes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"], strict=True):
            out["advantage"] = row.advantage
            out["met"] = row.met
        return data

    def markdown(self) -> str:
        m = self.machine
        lines = [
            "# ocicache load tests"
            + (" (quick: tiny sizes, a smoke run, not a measurement)" if self.quick else ""),
            "",
            f"Run {self.started}, {self.seconds:.0f} s; {m.get('cpus', '?')} CPUs ({m.get('cpu', '?')}), "
            f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}; load average before the run "
            f"{m.get('loadavg', '?')}. Everything on 127.0.0.1.",
            "",
            markdown_table(self.rows).rstrip("\n"),
            "",
            "Ratio: the median over rounds of the server's value over the baseline's in the same "
            "round, same client, same placement (↑: higher is better, ↓: lower is better). Others: the "
            "most cores that processes outside the harness, and the hypervisor (steal), took during "
            f"any of the row's measurements; above {NOISY:g} the row was disturbed by other load.",
            "",
            "Placements:",
            *[f"- `{name}`: {text}" for name, text in self.placements.items()],
            "",
            "Servers:",
            *[f"- {name}: {text}" for name, text in self.servers.items()],
            "",
            "Clients:",
            *[f"- {name}: {text}" for name, text in self.clients.items()],
        ]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        lines += ["", "| scenario | status | seconds | what it measures |", "| --- | --- | --: | --- |"]
        for o in self.outcomes:
            status = o.status if not o.error else f"{o.status}: {o.error[:200]}"
            lines.append(f"| {o.name} | {status} | {o.seconds:.0f} | {o.title} |")
        disturbed = [r for r in self.rows if r.disturbance > NOISY]
        if disturbed:
            lines += [
                "",
                f"**Warning:** {len(disturbed)} of {len(self.rows)} rows were measured while "
                f"other load took more than {NOISY:g} cores (up to "
                f"{max(r.disturbance for r in disturbed):.2f}): those ratios are less sure.",
            ]
        return "\n".join(lines) + "\n"
