"""Run batches on several cores: in this process and in worker processes; results in order.

Processes, not threads: much of a batch is short Python steps between C calls (a hash per
4 KiB block, a frame per chunk), which hold the GIL, so threads barely used a second core.

``processes`` counts this process: it scans the tar, and computes a batch itself whenever every
worker already has work queued, so N cores run N processes (fewer processes to start, fewer
results to pass, and no core left idle while the writer waits).

A worker is ``python -m lazyfs.formats.chunked.workers``: it imports only what
:func:`~lazyfs.formats.chunked.frames.compute_batch` needs (about 0.1 s to start), reads
batches from its stdin and writes results to its stdout, each message length-prefixed. It reads
the tar itself, so only op lists go to it and only frames and digests come back. It exits when
its stdin closes, so it cannot outlive the writer, even one that was killed. Results are taken
in submission order whoever computed them: where a batch ran never changes the blob.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Generic, TypeVar

from lazyfs.errors import LayoutError, LazyfsError, TocError
from lazyfs.formats.chunked.frames import Batch, BatchResult, compute_batch

T = TypeVar("T")

_HEADER_BYTES = 8
_EXIT_TIMEOUT_S = 10.0
_PIPE_BYTES = 1 << 20  # Linux's default limit for unprivileged processes
# Batches a worker holds at once (running and queued): enough that it never waits for the
# writer, which may be computing a batch itself.
_QUEUED_PER_WORKER = 2
# Results not taken yet, per process: how far others may run ahead of one slow batch (a large
# file's digests). Each holds at most a batch of frames (about 2 MB).
_PENDING_PER_PROCESS = 6
# Errors a worker may report, rebuilt from (class name, message) in the writer.
_ERRORS: dict[str, type[LazyfsError]] = {cls.__name__: cls for cls in (TocError, LayoutError)}
# The directory that holds the lazyfs package, so that a worker imports this very copy.
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]

# A worker's reply: a result, or (error class name, message).
_Reply = BatchResult | tuple[str, str]


def _reply(message: object, raw: bytes) -> _Reply:
    """Rebuild a reply from ``("ok", frame sizes, digests)`` + frames, or ``("error", ...)``."""
    match message:
        case ("ok", tuple(sizes), tuple(digests)):
            return BatchResult(raw, sizes, digests)
        case ("error", str(name), str(text)):
            return name, text
    raise ValueError(f"malformed reply from a conversion worker: {message!r:.100}")


class BatchRunner(Generic[T]):
    """Runs batches, each with a caller's ``tag``, and returns ``(tag, result)`` in order.

    ``processes`` counts this one: 1 computes every batch here, as it is submitted. Use as a
    context manager: leaving it stops every worker (killed at once after an error).
    """

    def __init__(self, processes: int) -> None:
        self._processes = processes
        self._workers: list[_Worker] = []
        # Oldest first: a result computed here, or the worker that computes it.
        self._pending: deque[tuple[T, BatchResult | _Worker]] = deque()

    @property
    def process_ids(self) -> list[int]:
        """The worker processes' ids (none: batches run in this process)."""
        return [worker.pid for worker in self._workers]

    def __enter__(self) -> BatchRunner[T]:
        if sys.executable:
            try:
                for _ in range(self._processes - 1):
                    self._workers.append(_Worker())
            except OSError as exc:  # no processes to be had: convert in this one
                import logging  # here: workers start faster without it

                logging.getLogger(__name__).warning(
                    "cannot start layer conversion workers (%s); converting in-process", exc
                )
                self._stop(kill=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop(kill=exc_type is not None)

    def submit(self, batch: Batch, tag: T) -> list[tuple[T, BatchResult]]:
        """Start ``batch``; returns the results, oldest first, that are ready or must be
        taken now to bound the results held."""
        done = []
        while len(self._pending) >= _PENDING_PER_PROCESS * self._processes:
            done.append(self._take_oldest())
        worker = min(self._workers, key=_Worker.unfinished, default=None)
        if worker is not None and worker.unfinished() < _QUEUED_PER_WORKER:
            worker.send(batch)
            self._pending.append((tag, worker))
        else:  # every worker is busy: this process is one more
            self._pending.append((tag, compute_batch(batch)))
        while self._pending and _is_ready(self._pending[0][1]):
            done.append(self._take_oldest())
        return done

    def drain(self) -> list[tuple[T, BatchResult]]:
        """Every result not taken yet, in order."""
        return [self._take_oldest() for _ in range(len(self._pending))]

    def _take_oldest(self) -> tuple[T, BatchResult]:
        tag, source = self._pending.popleft()
        return tag, source if isinstance(source, BatchResult) else source.take_reply()

    def _stop(self, kill: bool) -> None:
        workers, self._workers = self._workers, []
        self._pending.clear()
        for worker in workers:
            worker.close_input()
        for worker in workers:
            worker.stop(kill)


def _is_ready(source: BatchResult | _Worker) -> bool:
    return isinstance(source, BatchResult) or source.has_reply()


class _Worker:
    """One worker process, and the thread that reads its replies as they come."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if part
        )
        # What a worker prints (only a crash: it reports errors as replies) is kept for the
        # error that its exit becomes, not shown as a traceback.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (it lives as long as the worker)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=env,
            )
        except OSError:
            self._stderr.close()
            raise
        assert self._process.stdin is not None and self._process.stdout is not None
        for pipe in (self._process.stdin, self._process.stdout):
            _enlarge_pipe(pipe.fileno())
        self._requests: IO[bytes] = self._process.stdin
        self._replies_stream: IO[bytes] = self._process.stdout
        self._replies: queue.SimpleQueue[_Reply | None] = queue.SimpleQueue()
        # Each counter is written by one thread only: sent by the writer, received by the reader.
        self._sent = 0
        self._received = 0
        self._reader = threading.Thread(
            target=self._read_replies, name="lazyfs-convert-replies", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def unfinished(self) -> int:
        return self._sent - self._received

    def send(self, batch: Batch) -> None:
        try:
            _write_message(self._requests, batch)
        except OSError as exc:  # the worker is gone; its exit status tells why
            raise self._exited() from exc
        self._sent += 1

    def has_reply(self) -> bool:
        return not self._replies.empty()

    def take_reply(self) -> BatchResult:
        reply = self._replies.get()
        if reply is None:
            self._replies.put(None)  # later takes fail the same way
            raise self._exited()
        if isinstance(reply, BatchResult):
            return reply
        name, message = reply
        raise _ERRORS.get(name, LazyfsError)(message)

    def close_input(self) -> None:
        with contextlib.suppress(OSError):  # BrokenPipeError: the worker died first
            self._requests.close()

    def stop(self, kill: bool) -> None:
        if kill:
            self._process.kill()
        try:
            self._process.wait(timeout=_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join()
        self._replies_stream.close()
        self._stderr.close()

    def _read_replies(self) -> None:
        try:
            while (message := _read_message(self._replies_stream)) is not None:
                self._received += 1
                self._replies.put(_reply(*message))
        except (OSError, ValueError, pickle.UnpicklingError, EOFError):
            pass  # a broken stream is a dead worker: reported as such below
        finally:
            self._replies.put(None)

    def _exited(self) -> LazyfsError:
        try:
            status: int | None = self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            status = None
        how = "stopped answering" if status is None else f"exited with status {status}"
        return LazyfsError(f"a layer conversion worker process {how}{self._last_words()}")

    def _last_words(self) -> str:
        """The last line the worker wrote to stderr, as ``: line``."""
        try:
            self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 4096))
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines else ""


def _enlarge_pipe(fd: int) -> None:
    # A reply (a batch of frames) is about 2 MB: a 64 KiB pipe would take 30 wakeups to pass it.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


def _write_message(stream: IO[bytes], message: object, raw: bytes = b"") -> None:
    """A pickled ``message`` and ``raw`` bytes after it, which are not pickled: a batch's
    frames are most of what workers send, and pickling would copy them twice more."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(_HEADER_BYTES, "little"))
    stream.write(len(raw).to_bytes(_HEADER_BYTES, "little"))
    stream.write(data)
    stream.write(raw)
    stream.flush()


def _read_message(stream: IO[bytes]) -> tuple[object, bytes] | None:
    """The next message and its raw bytes, or None at the end of the stream."""
    header = stream.read(2 * _HEADER_BYTES)
    if len(header) < 2 * _HEADER_BYTES:
        return None
    size = int.from_bytes(header[:_HEADER_BYTES], "little")
    raw_size = int.from_bytes(header[_HEADER_BYTES:], "little")
    data = stream.read(size)
    raw = stream.read(raw_size)
    if len(data) < size or len(raw) < raw_size:
        return None
    message: object = pickle.loads(data)
    return message, raw


def _serve() -> None:
    """A worker's life: compute each batch that arrives on stdin, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the writer's to handle
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the replies
    try:
        while (request := _read_message(requests)) is not None:
            batch, _ = request
            assert isinstance(batch, Batch)
            try:
                result = compute_batch(batch)
            except LazyfsError as exc:
                _write_message(replies, ("error", type(exc).__name__, str(exc)))
            except Exception as exc:  # a bug: reported to the writer, which fails the conversion
                message = f"conversion worker: {type(exc).__name__}: {exc}"
                _write_message(replies, ("error", "LazyfsError", message))
            else:
                reply = ("ok", result.frame_sizes, result.digests)
                _write_message(replies, reply, result.frames)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the writer is gone


if __name__ == "__main__":
    _serve()
