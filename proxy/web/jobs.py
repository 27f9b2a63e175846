"""Prefetch jobs the admin API starts: ``POST /admin/v1/prefetch`` answers an id at once, and
``GET /admin/v1/jobs/{id}`` shows each blob's progress and, at the end, the outcome.

The prefetch itself is the air-gap layer's (``proxy.airgap.prefetch.prefetch``), which sits
above the web layer; the app is handed it (:data:`Prefetcher`) by whoever builds it, so this
module imports nothing from above. A job reports progress through :class:`JobProgress`, which
keeps one small record per blob.

Bounded: jobs run one at a time, in the order they came (the fills they start already share
the upstream connections with clients' pulls); at most ``MAX_QUEUED`` wait, and the last
``MAX_KEPT`` finished jobs are remembered. The jobs are the app's tasks, cancelled and awaited
when it stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Protocol

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

from proxy.core.errors import Code, OciError
from proxy.core.imageref import ImageRef
from proxy.flows.engine import Engine

log = structlog.get_logger("ocicache.jobs")

MAX_QUEUED: Final = 16
MAX_KEPT: Final = 100
# Blobs whose progress a job shows (the outcome still counts them all).
MAX_BLOBS_SHOWN: Final = 10_000


class JobState(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class BlobProgress:
    size: int | None = None
    done: int = 0
    state: str = "running"  # running | done | failed | cached
    error: str | None = None


class Progress(Protocol):
    """What a prefetch tells as it goes (the air-gap layer's ``PrefetchProgress``)."""

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None: ...

    def blob_advanced(self, digest: str, received: int) -> None: ...

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None: ...

    def blob_failed(self, digest: str, reason: str) -> None: ...

    def reference_finished(self, outcome: Any) -> None: ...


class Prefetcher(Protocol):
    def __call__(
        self,
        engine: Engine,
        references: list[ImageRef],
        *,
        platforms: frozenset[str] | None = None,
        progress: Any = None,
    ) -> Awaitable[Any]: ...


@dataclass
class Job:
    id: str
    references: list[str]
    platforms: list[str] | None
    created: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    started: float | None = None
    finished: float | None = None
    blobs: dict[str, BlobProgress] = field(default_factory=dict)
    # Each reference's outcome as it finishes (the report's, before the whole job ends).
    done_references: list[Any] = field(default_factory=list)
    outcome: Any = None
    error: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def progress(self) -> JobProgress:
        return JobProgress(self)

    def to_json(self) -> dict[str, Any]:
        done = sum(1 for b in self.blobs.values() if b.state in ("done", "cached"))
        return {
            "id": self.id,
            "state": self.state.value,
            "references": self.references,
            "platforms": self.platforms,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "blobs_total": len(self.blobs),
            "blobs_done": done,
            "bytes_done": sum(b.done for b in self.blobs.values()),
            "bytes_expected": sum(b.size or 0 for b in self.blobs.values()),
            "blobs": {d: dataclasses.asdict(b) for d, b in self.blobs.items()},
            "references_done": self.done_references,
            "outcome": self.outcome,
            "error": self.error,
        }


class JobProgress:
    """A job's :class:`Progress`: one record per blob, bounded."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def _blob(self, digest: str) -> BlobProgress | None:
        blobs = self._job.blobs
        entry = blobs.get(digest)
        if entry is None and len(blobs) < MAX_BLOBS_SHOWN:
            entry = blobs[digest] = BlobProgress()
        return entry

    def blob_started(self, reference: ImageRef, digest: str, size: int | None) -> None:
        entry = self._blob(digest)
        if entry is not None:
            entry.size = size
            entry.state = "running"

    def blob_advanced(self, digest: str, received: int) -> None:
        entry = self._blob(digest)
        if entry is not None:
            entry.done += received

    def blob_finished(self, digest: str, size: int, *, fetched: bool) -> None:
        entry = self._blob(digest)
        if entry is not None:
            entry.state = "done" if fetched else "cached"
            entry.size = entry.done = size

    def blob_failed(self, digest: str, reason: str) -> None:
        entry = self._blob(digest)
        if entry is not None:
            entry.state, entry.error = "failed", reason[:300]

    def reference_finished(self, outcome: Any) -> None:
        if len(self._job.done_references) < MAX_BLOBS_SHOWN:
            self._job.done_references.append(outcome_of(outcome))


def outcome_of(report: Any) -> Any:
    """A prefetch report as JSON values: its ``as_dict()``, else a dataclass field by field;
    what JSON has no type for as text."""
    if callable(getattr(report, "as_dict", None)):
        report = report.as_dict()
    elif dataclasses.is_dataclass(report) and not isinstance(report, type):
        report = dataclasses.asdict(report)
    return json.loads(json.dumps(report, default=str))


class Jobs:
    def __init__(self, engine: Engine, prefetch: Prefetcher | None) -> None:
        self._engine = engine
        self._prefetch = prefetch
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._refs: dict[str, list[ImageRef]] = {}  # what queued jobs will fetch
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._current: asyncio.Task[Any] | None = None

    @property
    def available(self) -> bool:
        return self._prefetch is not None

    def submit(self, references: Sequence[ImageRef], platforms: list[str] | None) -> Job:
        """Queue a job; raises UNSUPPORTED without a prefetch, UNAVAILABLE when too many wait."""
        if self._prefetch is None:
            raise OciError(Code.UNSUPPORTED, "prefetch is not available in this server")
        waiting = sum(1 for j in self._jobs.values() if j.state is JobState.QUEUED)
        if waiting >= MAX_QUEUED:
            raise OciError(
                Code.UNAVAILABLE,
                "too many prefetch jobs waiting",
                {"queued": waiting},
                headers={"Retry-After": "60"},
            )
        job = Job(secrets.token_hex(8), [str(r) for r in references], platforms)
        self._jobs[job.id] = job
        self._refs[job.id] = list(references)
        self._forget_old()
        self._queue.put_nowait(job)
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="prefetch jobs")
        log.info("prefetch_job_queued", job=job.id, references=job.references, platforms=platforms)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.finished is not None]
        for job_id in finished[: max(0, len(finished) - MAX_KEPT)]:
            del self._jobs[job_id]
            self._refs.pop(job_id, None)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            await self._run(job)

    async def _run(self, job: Job) -> None:
        assert self._prefetch is not None
        job.state, job.started = JobState.RUNNING, time.time()
        refs = self._refs.pop(job.id, [])
        try:
            self._current = asyncio.ensure_future(
                self._prefetch(
                    self._engine,
                    refs,
                    platforms=None if job.platforms is None else frozenset(job.platforms),
                    progress=job.progress,
                )
            )
            report = await self._current
            job.outcome = outcome_of(report)
            job.state = JobState.DONE
        except asyncio.CancelledError:
            job.state, job.error = JobState.CANCELLED, "the server stopped"
            raise
        except OciError as err:
            job.state, job.error = JobState.FAILED, f"{err.code.value}: {err.message}"
        except Exception as exc:
            log.exception("prefetch_job_crashed", job=job.id)
            job.state, job.error = JobState.FAILED, f"internal error: {type(exc).__name__}"
        finally:
            job.finished = time.time()
            job.ended.set()
            self._current = None
            log.info("prefetch_job_finished", job=job.id, state=job.state.value, error=job.error)

    async def close(self) -> None:
        for task in (self._current, self._worker):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._current, self._worker) if t is not None), return_exceptions=True
        )
        for job in self._jobs.values():
            if job.state is JobState.QUEUED:
                job.state, job.error, job.finished = JobState.CANCELLED, "the server stopped", time.time()
                job.ended.set()

    def metrics(self) -> Iterator[Metric]:
        states = GaugeMetricFamily("ocicache_prefetch_jobs", "Prefetch jobs by state", labels=["state"])
        for state in JobState:
            states.add_metric([state.value], sum(1 for j in self._jobs.values() if j.state is state))
        yield states
        running = [j for j in self._jobs.values() if j.state is JobState.RUNNING]
        blobs = GaugeMetricFamily(
            "ocicache_prefetch_blobs", "Blobs of running prefetch jobs, done or pending", labels=["state"]
        )
        done = sum(1 for j in running for b in j.blobs.values() if b.state in ("done", "cached"))
        total = sum(len(j.blobs) for j in running)
        blobs.add_metric(["done"], done)
        blobs.add_metric(["pending"], total - done)
        yield blobs
        size = GaugeMetricFamily(
            "ocicache_prefetch_bytes",
            "Bytes of running prefetch jobs: done, and expected in all",
            labels=["state"],
        )
        size.add_metric(["done"], sum(b.done for j in running for b in j.blobs.values()))
        size.add_metric(["expected"], sum(b.size or 0 for j in running for b in j.blobs.values()))
        yield size
