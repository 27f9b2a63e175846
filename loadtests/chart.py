"""The report as a PNG chart: one bar per row, how many times better ocicache did than its baseline.

Rows mix metrics where higher is better (GB/s, requests/s) with ones where lower is (seconds,
latency), so each bar shows the row's advantage: the ratio, or its inverse where lower is better.
Right of the line at 1 the subject did better. A target on the ratio is drawn as a tick on its
bar; the bar is green where every target was met, red where one was missed, grey with none.
matplotlib is in the ``bench`` extra (and the ``test`` one, for the smoke tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from loadtests.report import Row

GREEN: Final = "#2e8b57"
RED: Final = "#c0392b"
GREY: Final = "#8c8c8c"
ROW_HEIGHT: Final = 0.32  # inches per bar


def label(row: Row) -> str:
    subject = "" if row.subject == "ocicache" else f"{row.subject} "
    where = f"[{row.client}, {row.placement}]"
    return f"{row.scenario}: {row.case}, {row.metric}, {subject}vs {row.baseline} {where}"


def target_advantage(row: Row) -> float | None:
    """Where the row's ratio target lies on the advantage axis."""
    for check in row.checks:
        if check.on == "ratio" and check.bound > 0:
            return check.bound if row.better == "higher" else 1 / check.bound
    return None


def draw(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.advantage is not None]
    fig, ax = plt.subplots(figsize=(15, 1.5 + ROW_HEIGHT * max(1, len(shown))))
    try:
        ys = list(range(len(shown)))[::-1]
        values = [r.advantage or 0.0 for r in shown]
        colours = [GREY if r.met is None else GREEN if r.met else RED for r in shown]
        ax.barh(ys, values, color=colours, height=0.7)
        for y, row, value in zip(ys, shown, values, strict=True):
            ax.annotate(
                f"{value:.2f}x",
                (value, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
            if (target := target_advantage(row)) is not None:
                ax.plot([target, target], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        ax.set_yticks(ys, [label(r) for r in shown], fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        if values and max(values) / max(min(values), 1e-9) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("advantage over the baseline (ratio, inverted where lower is better; > 1: better)")
        ax.set_title(title, fontsize=10)
        # Room on the left for the long row labels, which tight_layout would cut.
        fig.subplots_adjust(
            left=0.45, right=0.97, top=1 - 0.6 / fig.get_figheight(), bottom=0.8 / fig.get_figheight()
        )
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
