"""Progress as prefetch shows it: bars on a terminal, one line per blob elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from proxy.airgap.prefetch import ReferenceOutcome
from proxy.cli.progress import Bars, Lines, for_output
from proxy.core.imageref import ImageRef

REF = ImageRef("docker.io", "library/app", "v1", None)
A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def drive(progress: Lines | Bars) -> None:
    with progress:
        progress.blob_started(REF, A, 2048)
        progress.blob_advanced(A, 1024)
        progress.blob_advanced(A, 1024)
        progress.blob_finished(A, 2048, fetched=True)
        progress.blob_finished(B, 10, fetched=False)
        progress.blob_started(REF, "sha256:" + "c" * 64, None)
        progress.blob_failed("sha256:" + "c" * 64, "UPSTREAM_ERROR: [bad] bytes")
        progress.reference_finished(ReferenceOutcome(REF, digest=A, platforms=("linux/amd64",)))
        progress.reference_finished(ReferenceOutcome(REF, error="MANIFEST_UNKNOWN: [x]"))


def test_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = for_output(out)
    assert isinstance(progress, Lines)
    drive(progress)
    assert out.getvalue().splitlines() == [
        f"fetched {A} 2.0 KiB (docker.io/library/app:v1)",
        f"cached  {B} 10 B",
        f"failed  sha256:{'c' * 64}: UPSTREAM_ERROR: [bad] bytes",
        f"ok docker.io/library/app:v1 {A} [linux/amd64]",
        "FAILED docker.io/library/app:v1: MANIFEST_UNKNOWN: [x]",
    ]


def test_bars_on_a_terminal_print_every_blob_and_keep_brackets() -> None:
    out = io.StringIO()
    bars = Bars(Console(file=out, force_terminal=True, width=200, color_system=None))
    drive(bars)
    text = out.getvalue()
    for expected in (f"fetched {A}", f"cached  {B}", "[bad] bytes", "[linux/amd64]", "MANIFEST_UNKNOWN: [x]"):
        assert expected in text, text
    assert bars.progress.tasks[0].completed == 2048  # the overall bar
