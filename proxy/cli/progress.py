"""How ``prefetch`` (and ``export``, when it prefetches) shows its progress: on a terminal, a
bar per downloading layer and one overall (bytes, rate, time left), with a line above the bars
for every blob finished; elsewhere (a log, CI), one plain line per finished blob."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Self, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from proxy.airgap.prefetch import NoProgress, ReferenceOutcome, human_bytes
from proxy.core.imageref import ImageRef


def short(digest: str) -> str:
    return digest.partition(":")[2][:12]


def outcome_line(outcome: ReferenceOutcome) -> str:
    if not outcome.ok:
        return f"FAILED {outcome.reference}: {outcome.error}"
    platforms = f" [{', '.join(outcome.platforms)}]" if outcome.platforms else ""
    return f"ok {outcome.reference} {outcome.digest}{platforms}"


class Lines(NoProgress):
    """One line per finished blob and per reference."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._names: dict[str, str] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        self._names[digest] = str(reference)

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        what = "fetched" if fetched else "cached "
        where = self._names.pop(digest, "")
        self._print(f"{what} {digest} {human_bytes(size)}" + (f" ({where})" if where else ""))

    def blob_failed(self, digest: str, reason: str) -> None:
        self._names.pop(digest, None)
        self._print(f"failed  {digest}: {reason}")

    def reference_finished(self, outcome: ReferenceOutcome) -> None:
        self._print(outcome_line(outcome))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Bars(NoProgress):
    """rich progress bars: one per download, one overall."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.overall = self.progress.add_task("total", total=0)
        self._tasks: dict[str, TaskID] = {}
        self._total = 0

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        self._tasks[digest] = self.progress.add_task(f"{short(digest)} {reference.repository}", total=size)
        self._total += size or 0
        self.progress.update(self.overall, total=self._total)

    def blob_advanced(self, digest: str, received: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self.progress.advance(task, received)
        self.progress.advance(self.overall, received)

    def _done(self, digest: str) -> None:
        task = self._tasks.pop(digest, None)
        if task is not None:
            self.progress.remove_task(task)

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        self._done(digest)
        what = "fetched" if fetched else "cached "
        self.progress.console.print(f"{what} {digest} {human_bytes(size)}", highlight=False)

    def blob_failed(self, digest: str, reason: str) -> None:
        self._done(digest)
        self.progress.console.print(f"[red]failed[/red]  {digest}: {escape(reason)}", highlight=False)

    def reference_finished(self, outcome: ReferenceOutcome) -> None:
        line = escape(outcome_line(outcome))
        self.progress.console.print(line if outcome.ok else f"[red]{line}[/red]", highlight=False)

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


def for_output(stream: TextIO | None = None) -> Lines | Bars:
    stream = stream or sys.stdout
    console = Console(file=stream)
    return Bars(console) if console.is_terminal else Lines(stream)
