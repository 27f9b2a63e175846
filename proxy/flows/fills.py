"""Single-flight blob downloads: one upstream download per digest, however many clients wait.

:class:`Fills` is the app's table of running fills (:class:`proxy.flows.fill.Fill`), keyed by
digest, and the tasks that run them: a fill downloads one blob into a temp file
(:mod:`proxy.flows.download`), and commits it into the cache only when the digest matches.
Fills are tasks the application owns, not the request that started them: a client that leaves
does not cancel the download that others, or the cache, still want.

Lock order: there are no locks. Everything runs on the loop thread except file writes and
hashing, which the fill's tasks await in worker threads.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from proxy.core.errors import Code, OciError
from proxy.core.reference import Digest
from proxy.flows.download import DISK_FULL, Download, Plan
from proxy.flows.fill import Fill, State
from proxy.flows.sourcing import Sourcing
from proxy.flows.window import Window
from proxy.store.cache import BlobCache
from proxy.store.storage import Storage
from proxy.upstream.client import UpstreamClient

__all__ = ["Fill", "Fills", "Plan", "State"]

log = structlog.get_logger("ocicache.fills")


class Fills:
    """The app's table of running fills, keyed by digest, and the tasks that run them."""

    def __init__(
        self,
        storage: Storage,
        cache: BlobCache,
        *,
        plan: Plan,
        cancel_abandoned: bool,
        on_commit: Callable[[Fill], Awaitable[None]] | None = None,
        on_finish: Callable[[Fill], None] | None = None,
        sourcing: Sourcing | None = None,
    ) -> None:
        self.storage = storage
        self.cache = cache
        self.plan = plan
        self.cancel_abandoned = cancel_abandoned
        self.on_commit = on_commit
        self.on_finish = on_finish
        # In a cluster: peers and leases decide where each fill's bytes come from.
        self.sourcing = sourcing
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Called with every fill a reader joins (after it counted the reader): for observers
        # such as tests that must know when N clients share one download.
        self.join_observers: list[Callable[[Fill], None]] = []

    def get(self, digest: Digest) -> Fill | None:
        return self._fills.get(digest)

    def __len__(self) -> int:
        return len(self._fills)

    def join(self, digest: Digest, upstream: UpstreamClient, repository: str) -> tuple[Fill, bool]:
        """The running fill for ``digest``, started if there is none; and whether we started it.
        The caller has acquired it and must call :meth:`leave`."""
        fill = self._fills.get(digest)
        started = fill is None
        if fill is None:
            fill = Fill(digest, upstream, repository, self.storage.new_temp())
            self._fills[digest] = fill
            task = asyncio.get_running_loop().create_task(self._run(fill), name=f"fill {digest}")
            fill.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fill.acquire()
        for observe in self.join_observers:
            observe(fill)
        return fill, started

    def leave(self, fill: Fill) -> None:
        remaining = fill.release()
        # A verified fill has only its commit left (fsync, rename, index): cancelling it then
        # would throw away a good download, or leave a renamed file the index never heard of.
        if (
            remaining == 0
            and self.cancel_abandoned
            and fill.state in (State.STARTING, State.RUNNING)
            and not fill.verified
            and fill.task is not None
        ):
            log.info("fill_abandoned", digest=str(fill.digest), written=fill.written)
            fill.task.cancel()

    async def settled(self) -> None:
        """Wait until every fill running now has committed or failed."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Stop downloads under way; a verified one only has its commit left, so let it finish."""
        for fill in list(self._fills.values()):
            if fill.task is not None and not fill.verified:
                fill.task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- the fill task ---------------------------------------------------------------------

    async def _run(self, fill: Fill) -> None:
        write_fd = -1
        sources = None if self.sourcing is None else self.sourcing.for_fill(fill)
        if sources is None:
            fill.from_upstream = True
            fill.sourced.set()
        try:
            try:
                write_fd, fill.read_fd = await asyncio.to_thread(_open_pair, fill.temp)
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise
                # Not even an empty file fits: every byte goes through the memory window.
                fill.window = Window(0, stall=self.plan.stall)
            got = await Download(fill, write_fd, self.cache, self.plan, sources).run()
            if got != fill.digest.hex:
                log.error(
                    "digest_mismatch",
                    digest=str(fill.digest),
                    upstream=fill.upstream.name,
                    repository=fill.repository,
                    got=f"{fill.digest.algorithm}:{got}",
                    peers=sorted(sources.peers_used) if sources is not None and fill.peer_received else None,
                )
                if sources is not None and fill.peer_received:
                    await sources.distrust_peers()
                raise OciError(Code.UPSTREAM_ERROR, "upstream blob does not match its digest")
            fill.size = fill.written
            fill.verified = True
            fill.announce()
            if fill.window is not None:
                # Served whole to every reader; nothing of it is cached.
                fill.state = State.DONE
                log.warning("fill_uncached", digest=str(fill.digest), bytes=fill.written, reason="disk full")
                return
            # From here on the download is good: the commit runs to its end even if this task is
            # cancelled (a shutdown), so that no renamed file is left out of the index.
            commit = asyncio.ensure_future(self._commit(fill, write_fd))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:
                await asyncio.wait([commit])
                raise
            if self.on_commit is not None:
                await self.on_commit(fill)
            fill.state = State.DONE
            log.info("fill_committed", digest=str(fill.digest), bytes=fill.written, gets=fill.upstream_gets)
        except asyncio.CancelledError:
            fill.error = OciError(Code.UNAVAILABLE, "download cancelled")
            raise
        except OciError as err:
            fill.error = err
            log.warning(
                "fill_failed",
                digest=str(fill.digest),
                code=err.code.value,
                reason=err.message,
                written=fill.written,
            )
        except OSError as exc:
            fill.error = OciError(Code.UNAVAILABLE, "cache disk error")
            log.error("fill_disk_error", digest=str(fill.digest), error=str(exc))
        finally:
            if fill.state is not State.DONE:
                fill.state = State.FAILED
                if fill.error is None:
                    fill.error = OciError(Code.UNAVAILABLE, "download failed")
                if fill.unverified_count:
                    log.warning(
                        "unverified_ranges_of_failed_fill",
                        digest=str(fill.digest),
                        clients=fill.unverified_readers,
                        count=fill.unverified_count,
                        reason=fill.error.message,
                    )
            del self._fills[fill.digest]
            if write_fd >= 0:
                os.close(write_fd)
            if not fill.committed:
                # Readers hold the read fd, not the path: unlinking now loses nothing of theirs.
                fill.temp.unlink(missing_ok=True)
            fill.maybe_close_reader()
            fill.sourced.set()
            fill.announce()
            if sources is not None:
                await sources.end(fill.committed)
            if self.on_finish is not None:
                self.on_finish(fill)

    async def _commit(self, fill: Fill, write_fd: int) -> None:
        await asyncio.to_thread(_sync_and_commit, write_fd, self.storage, fill.temp, fill.digest)
        fill.committed = True
        await self.cache.add(fill.digest, fill.written)


def _open_pair(path: Path) -> tuple[int, int]:
    write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return write_fd, os.open(path, os.O_RDONLY)
    except OSError:
        os.close(write_fd)
        raise


def _sync_and_commit(fd: int, storage: Storage, temp: Path, digest: Digest) -> None:
    os.fsync(fd)
    storage.commit(temp, digest)
