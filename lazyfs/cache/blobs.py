"""Whole blobs kept under the cache directory (``layers/``), named by digest.

Two kinds land here: plain layers converted into local zstd:chunked blobs at mount time, and
whole blobs a pull-through proxy sent in answer to a Range request. A blob gets its final name
only by an atomic rename, after its digest was checked, so a reader never sees a partial one.
It is also a byte source (lazyfs/model/bytesource.py): chunks read from it are verified by the
resolver like any others.

Local blobs count against the cache's bound and are evicted before chunks, least recently used
first (by mtime, which reads refresh at most once a minute). A blob in use is *held*: the process
keeps a descriptor with a shared ``flock`` on it, and eviction (in any process) takes an exclusive
non-blocking one and skips the blob if that fails. A process holds what it adopted or read;
``sweep`` lets go of blobs idle for a while, except those ``keep`` names (plain layers converted
locally: a mount of one has no other source for its chunks), and of files evicted meanwhile, so a
descriptor never keeps the space of a deleted blob.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from lazyfs.errors import CacheError, LazyfsError, NotFoundError
from lazyfs.localfiles import AtomicFile
from lazyfs.model.bytesource import RangeListener
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange

_TOUCH_EVERY_S = 60.0  # a read refreshes the blob's mtime (its LRU age) at most this often
HOLD_IDLE_S = 120.0  # a blob not read for this long is let go (unless ``keep`` says otherwise)
_ALGORITHMS = ("sha256", "sha512")


@dataclass
class _Hold:
    fd: int
    used: float  # time.monotonic() of the last read
    touched: float


@dataclass(frozen=True)
class BlobFile:
    path: Path
    digest: Digest
    size: int
    mtime: float


class LocalBlobs:
    def __init__(
        self,
        directory: Path,
        staging_dir: Path,
        keep: Callable[[Digest], bool] = lambda _blob: False,
    ) -> None:
        self.directory = directory
        self._staging_dir = staging_dir
        self._keep = keep
        self._held: dict[Digest, _Hold] = {}
        self._lock = threading.Lock()
        self.changed = 0  # bumped when this process adds or evicts a blob (usage is stale)

    def path(self, blob: Digest) -> Path:
        return self.directory / blob.algorithm / blob.hex

    def has(self, blob: Digest) -> bool:
        return self.path(blob).is_file()

    def keeper(self, blob: Digest) -> AtomicFile | None:
        """Where to write ``blob`` as it arrives (None if it is already here); the caller
        commits it once the digest checked out."""
        if self.has(blob):
            return None
        final = self.path(blob)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create {final.parent}: {exc.strerror}") from exc
        return _KeptBlob(final, self)

    def adopt(self, path: Path, blob: Digest) -> None:
        """Move the verified file ``path`` (on this file system) into place as ``blob``."""
        final = self.path(blob)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)  # atomic: a half-written blob never has the final name
        except OSError as exc:
            raise CacheError(f"cannot store blob {blob} in {self.directory}: {exc}") from exc
        self.changed += 1
        with contextlib.suppress(NotFoundError):
            self._hold(blob)  # in use from now on: a mount is about to read it

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch directory on the same file system, removed afterwards."""
        try:
            self._staging_dir.mkdir(parents=True, exist_ok=True)
            scratch = tempfile.TemporaryDirectory(dir=self._staging_dir)
        except OSError as exc:
            raise CacheError(f"cannot create scratch space in {self._staging_dir}: {exc}") from exc
        with scratch as name:
            yield Path(name)

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]:
        """``on_data`` is not called: the ranges come from one pread each, all at once."""
        return await anyio.to_thread.run_sync(self._read, blob, list(ranges))

    def _read(self, blob: Digest, ranges: list[ByteRange]) -> list[bytes]:
        fd = self._hold(blob)
        return [os.pread(fd, rng.length, rng.start) for rng in ranges]

    def _hold(self, blob: Digest) -> int:
        """A held descriptor of ``blob`` (opened and share-locked on first use)."""
        now = time.monotonic()
        with self._lock:
            held = self._held.get(blob)
            if held is not None:
                held.used = now
                if now - held.touched >= _TOUCH_EVERY_S:
                    held.touched = now
                    with contextlib.suppress(OSError):
                        os.utime(held.fd)
                return held.fd
        fd = _open_shared(self.path(blob), blob, self.directory)
        with self._lock:
            if blob in self._held:  # another thread won: use its descriptor
                os.close(fd)
                return self._held[blob].fd
            self._held[blob] = _Hold(fd, now, now)
        with contextlib.suppress(OSError):
            os.utime(fd)
        return fd

    def sweep(self, idle_s: float = HOLD_IDLE_S) -> int:
        """Let go of evicted blobs, and of idle ones ``keep`` does not name; how many."""
        now = time.monotonic()
        with self._lock:
            held = list(self._held.items())
        released = 0
        for blob, hold in held:
            try:
                gone = os.fstat(hold.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone or (now - hold.used >= idle_s and not self._keep(blob)):
                with self._lock:
                    if self._held.get(blob) is hold:
                        del self._held[blob]
                        os.close(hold.fd)
                        released += 1
        return released

    def files(self) -> list[BlobFile]:
        """Every complete blob here (temp files of blobs being written are not blobs)."""
        found = []
        for algorithm in _ALGORITHMS:
            folder = self.directory / algorithm
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if name.startswith("."):
                    continue
                try:
                    info = os.lstat(folder / name)
                    digest = Digest.parse(f"{algorithm}:{name}")
                except (OSError, LazyfsError):
                    continue
                found.append(BlobFile(folder / name, digest, info.st_size, info.st_mtime))
        return found

    def evict(self, over_bytes: int) -> tuple[int, int]:
        """Remove blobs no process holds, least recently used first, until ``over_bytes`` are
        freed; (blobs removed, bytes freed)."""
        removed = freed = 0
        for blob in sorted(self.files(), key=lambda b: b.mtime):
            if freed >= over_bytes:
                break
            if _remove_unheld(blob.path):
                removed += 1
                freed += blob.size
        if removed:
            self.changed += 1
        return removed, freed

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, {}
        for hold in held.values():
            with contextlib.suppress(OSError):
                os.close(hold.fd)


class _KeptBlob(AtomicFile):
    """A blob being kept as it arrives; committing it changes the cache's usage."""

    def __init__(self, dest: Path, blobs: LocalBlobs) -> None:
        super().__init__(dest)
        self._blobs = blobs

    def commit(self) -> None:
        super().commit()
        self._blobs.changed += 1


def _open_shared(path: Path, blob: Digest, directory: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFoundError(f"blob {blob} is not in {directory}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # an evictor holds LOCK_EX only while it unlinks
        if os.fstat(fd).st_nlink == 0:  # evicted between our open and our lock
            raise NotFoundError(f"blob {blob} is not in {directory}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_unheld(path: Path) -> bool:
    """Unlink ``path`` unless a process holds it; whether it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use: a mount reads it
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheError(f"cannot evict blob {path}: {exc.strerror}") from exc
        return True
    finally:
        os.close(fd)
