"""Worker threads of the warm read path (docs/concurrency.md, invariant 15).

A cached chunk whose bytes the page cache does not hold is read from its file in a worker
thread. anyio's ``to_thread.run_sync`` costs about 190 µs a round trip on the benchmark machine
(two vCPUs): trio's thread cache, its ``run_sync_soon`` wake-up, the capacity limiter and the
context copy. A read of 4 KiB from the disk takes about 60 µs, so these threads of their own
take jobs from a ``queue.SimpleQueue`` and report completion through a pipe that the event
loop waits on (``anyio.wait_readable``): about 60 µs a round trip.

They run chunk-file reads only (``lazyfs.cache.chunkfiles.read_blocking``): jobs that touch no
event-loop state, never raise, and never touch our own mountpoint. The threads are shared by
the process (``THREADS`` of them, started on first use, daemons: a read that blocks forever
on a sick disk never keeps the process from exiting); each event loop's :class:`FileReaders`
has its own pipe and completion queue.

Completion runs on the loop: whichever read is waiting takes the pipe (one task may wait on an
fd at a time) and finishes every job done so far, calling each job's ``finish``; when its own
job is done it hands the pipe to another waiting read. A read that stops waiting (its deadline)
leaves its job to be finished by a later read, and :meth:`FileReaders.poll`, called at the
start of every read, finishes jobs nobody waits for (read-ahead). So a job's ``finish`` (which
gives back the descriptors the job held) always runs on the loop, after the thread is done.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable

import anyio

log = logging.getLogger(__name__)

THREADS = 2  # for reads that wait: the work is waiting for the disk
BACKGROUND_THREADS = 1  # for read-ahead (WILLNEED), so that it never delays a read

_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_background_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


class _Job:
    __slots__ = ("finish", "finished", "owner", "waiter", "work")

    def __init__(
        self, work: Callable[[], object], finish: Callable[[], None], owner: _Completions
    ) -> None:
        self.work = work
        self.finish = finish
        self.owner = owner
        self.finished = False
        self.waiter: anyio.Event | None = None


class _Completions:
    """What reader threads report to one loop: jobs done, and a pipe that says so."""

    def __init__(self) -> None:
        self.done: collections.deque[_Job] = collections.deque()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def report(self, job: _Job) -> None:
        """Reader thread: ``job`` is done."""
        self.done.append(job)
        with contextlib.suppress(BlockingIOError, OSError):  # full: it is readable anyway
            os.write(self.write_fd, b"\0")

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _work(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        job = jobs.get()
        try:
            job.work()
        except BaseException:  # read_blocking never raises; a bug must not end the thread
            log.exception("a chunk-file read crashed")
        job.owner.report(job)


def _ensure_threads() -> None:
    if len(_threads) >= THREADS + BACKGROUND_THREADS:
        return
    with _threads_lock:
        while len(_threads) < THREADS + BACKGROUND_THREADS:
            jobs = _jobs if len(_threads) < THREADS else _background_jobs
            thread = threading.Thread(
                target=_work, args=(jobs,), name=f"lazyfs file reader {len(_threads)}", daemon=True
            )
            thread.start()
            _threads.append(thread)


class FileReaders:
    """The reader threads, as one event loop sees them. Event-loop state."""

    def __init__(self) -> None:
        self._completions = _Completions()
        self._pending: set[_Job] = set()
        self._pumping = False
        weakref.finalize(self, self._completions.close)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(
        self, work: Callable[[], object], finish: Callable[[], None], *, background: bool = False
    ) -> _Job:
        """Start ``work`` in a reader thread; ``finish`` runs on the loop once it is done (at a
        later :meth:`poll` or :meth:`run`). ``background`` work (read-ahead) has a thread of
        its own. Synchronous: no task, no wait."""
        _ensure_threads()
        job = _Job(work, finish, self._completions)
        self._pending.add(job)
        (_background_jobs if background else _jobs).put(job)
        return job

    async def run(self, work: Callable[[], object], finish: Callable[[], None]) -> None:
        """``submit`` and wait until ``finish`` has run. Cancelled, the wait ends but the job
        does not: it is finished later, by another read."""
        job = self.submit(work, finish)
        try:
            while not job.finished:
                if self._pumping:
                    job.waiter = anyio.Event()
                    await job.waiter.wait()
                    continue
                self._pumping = True
                try:
                    await anyio.wait_readable(self._completions.read_fd)
                    self._finish_done()
                finally:
                    self._pumping = False
                    self._hand_over()
        finally:
            job.waiter = None  # cancelled or done: nobody to wake here any more
            if not job.finished and not self._pumping:
                self._hand_over()

    def poll(self) -> None:
        """Finish the jobs done so far, unless a read waits on the pipe (it will: taking its
        job's completion here would leave it waiting for a wake-up already consumed). A read
        calls this first; cheap when there is nothing to do."""
        if self._completions.done and not self._pumping:
            self._finish_done()

    def _finish_done(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._completions.read_fd, 4096):
                pass
        done = self._completions.done
        while done:
            job = done.popleft()
            self._pending.discard(job)
            job.finished = True
            try:
                job.finish()
            except Exception:  # nothing escapes: the read that waits would see it, not others
                log.exception("finishing a chunk-file read crashed")
            if job.waiter is not None:
                job.waiter.set()

    def _hand_over(self) -> None:
        """The pipe is free: wake a read still waiting for its job, to wait on it next."""
        for job in self._pending:
            if job.waiter is not None and not job.finished:
                job.waiter.set()
                return
