"""The warm read path: cached chunk bytes read straight from diskcache's own files.

The chunk store (store.py) keeps every chunk in a file of its own under ``chunks/`` and the
file's name in diskcache's row for the chunk. :class:`ChunkFiles` remembers, for the chunks
this process stored or read through the store, which file holds each one (an index bounded in
entries), and keeps the most recently read files open (bounded in descriptors). A read of a
cached chunk is then a dictionary lookup and one ``preadv`` of just the bytes asked for:

- on the event loop with ``RWF_NOWAIT`` (:meth:`ChunkFiles.read_nowait`): the kernel copies from
  the page cache or answers EAGAIN at once (having started reading the file ahead: a later
  blocking read finds its I/O under way);
- else in a worker thread (:func:`read_blocking`), which also opens files not open yet.

Nothing here ever admits bytes: the index only names files of rows that diskcache committed
(the store reports them after its transaction, or reads them from the row), and such rows only
hold verified chunks. diskcache stays the store and the authority on eviction: it may delete a
file at any time (cull, another process). A read of a deleted file either still reads it, through
a descriptor opened before (the bytes are the verified chunk: entries are immutable), or fails
(ENOENT, a short read): the caller then forgets the entry and takes the normal path through the
store. :meth:`ChunkFiles.sweep` closes descriptors of files diskcache deleted (``st_nlink`` 0),
so that evicted chunks do not keep their disk space.

Threads (docs/concurrency.md): a ChunkFiles is event-loop state, like the resolver's. A worker
thread is handed :class:`FileRead` jobs and the directory descriptor, fills the jobs in, and
touches nothing else; a descriptor lent to a job is not closed before the loop settles the job
(:meth:`ChunkFiles.settle`), so a thread never reads a descriptor number that was reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
_MAX_ENTRIES = 1 << 16  # about 150 bytes each, beyond the key the resolver already holds
_MAX_OPEN = 4096
_RESOLVE_CACHED = 0x20  # openat2(2): fail with EAGAIN unless the lookup needs no I/O
_SYS_OPENAT2 = 437  # the same number on every architecture (since Linux 5.6)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _CachedOpen:
    """``openat2(dir_fd, name, RESOLVE_CACHED)``: an open that never waits for the disk."""

    def __init__(self) -> None:
        self._syscall: Callable[..., int] | None = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            syscall = libc.syscall
            syscall.restype = ctypes.c_long
            self._syscall = syscall
        except (OSError, AttributeError):
            self._syscall = None

    def __call__(self, dir_fd: int, name: str) -> int | None:
        """A new descriptor; None when the lookup would need I/O or openat2 is missing.
        Raises FileNotFoundError for a file that is gone."""
        if self._syscall is None:
            return None
        how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_CACHED)
        fd = self._syscall(
            _SYS_OPENAT2, dir_fd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code == errno.ENOENT:
            raise FileNotFoundError(code, os.strerror(code), name)
        if code in (errno.ENOSYS, errno.EINVAL, errno.E2BIG, errno.EPERM):
            self._syscall = None  # an older kernel (or a filter): open in threads from now on
        return None


@dataclass(frozen=True)
class _Entry:
    verity: str  # the chunk's key in the store
    name: str  # diskcache's file for it, relative to the chunk directory


class _Open:
    """An open chunk file; ``users`` worker-thread jobs hold it, so it stays open for them."""

    __slots__ = ("dropped", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dropped = False


class FileRead:
    """One read for a worker thread: bytes ``[offset, offset + len(dest))`` of one chunk's file
    into ``dest``, or with ``whole`` the chunk itself (``size`` bytes) into ``data``.

    With ``advise`` it only opens the file and advises WILLNEED for all of it (read-ahead).
    The thread sets ``done`` (all bytes read), ``gone`` (the file is missing or shorter than
    the chunk: take the normal path) and ``new_fd`` (a descriptor it opened, for the loop to
    keep or close)."""

    __slots__ = (
        "advise", "data", "dest", "done", "entry", "fd", "gone", "held", "key", "new_fd",
        "offset", "size", "whole",
    )  # fmt: skip

    def __init__(
        self,
        key: str,
        entry: _Entry,
        offset: int,
        dest: memoryview,
        whole: bool,
        size: int,
        advise: bool = False,
    ) -> None:
        self.key = key
        self.entry = entry
        self.offset = offset
        self.dest = dest
        self.whole = whole
        self.size = size
        self.advise = advise
        self.fd = -1  # lent by the loop, or -1: the thread opens entry.name
        self.held: _Open | None = None
        self.new_fd = -1
        self.done = False
        self.gone = False
        self.data: bytes | None = None

    @property
    def verity(self) -> str:
        return self.entry.verity


def default_max_open() -> int:
    """Descriptors to keep open: a quarter of this process's soft limit, at most 4096."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_OPEN
    return max(16, min(_MAX_OPEN, soft // 4))


class ChunkFiles:
    """Which file holds each cached chunk this process knows of, and the open ones. Event-loop
    state (module docstring): only the loop calls its methods, and ``close`` after it ended."""

    def __init__(
        self,
        directory: Path,
        *,
        max_entries: int = _MAX_ENTRIES,
        max_open: int | None = None,
    ) -> None:
        self.directory = directory
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._max_entries = max_entries
        self._max_open = default_max_open() if max_open is None else max_open
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by read key, LRU first
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._open_cached = _CachedOpen()
        self._nowait = hasattr(os, "preadv") and hasattr(os, "RWF_NOWAIT")
        self.learned_since_sweep = 0
        self.evicted = 0  # entries dropped for the bound, ever

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def learn(self, key: str, verity: str, name: str) -> None:
        """``key``'s chunk (fs-verity digest ``verity``) is in the committed file ``name``."""
        old = self._entries.get(key)
        if old is not None and old.name == name:
            self._entries.move_to_end(key)
            return
        if old is not None:
            self._close(key)
        self._entries[key] = _Entry(verity, name)
        self.learned_since_sweep += 1
        while len(self._entries) > self._max_entries:
            evicted, _ = self._entries.popitem(last=False)
            self._close(evicted)
            self.evicted += 1

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)
        self._close(key)

    def entry(self, key: str) -> _Entry | None:
        return self._entries.get(key)

    def read_nowait(self, key: str, offset: int, dest: memoryview) -> int | None:
        """Copy what the page cache holds of ``key``'s bytes from ``offset`` into ``dest``
        without waiting for the disk: the count (0 when nothing could be had at once, fewer
        than asked when only a first part is cached), or None when ``key`` is unknown here.
        Never blocks: a file not open yet is opened only if its lookup needs no I/O."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._nowait:
            return 0
        held = self._open.get(key)
        if held is None:
            try:
                fd = self._open_cached(self.dir_fd, entry.name)
            except FileNotFoundError:
                self.forget(key)
                return None
            if fd is None:
                return 0
            held = self._keep(key, fd)
        else:
            self._open.move_to_end(key)
        self._entries.move_to_end(key)
        try:
            return os.preadv(held.fd, [dest], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # no RWF_NOWAIT here: every file read goes to a thread
            return 0

    def job(
        self,
        key: str,
        offset: int,
        dest: memoryview,
        *,
        whole: bool = False,
        size: int = 0,
        advise: bool = False,
    ) -> FileRead | None:
        """A read of ``key`` for a worker thread (None if unknown); it holds the descriptor
        until :meth:`settle`."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        read = FileRead(key, entry, offset, dest, whole, size, advise)
        held = self._open.get(key)
        if held is not None:
            held.users += 1
            read.fd, read.held = held.fd, held
        return read

    def settle(self, reads: Sequence[FileRead]) -> None:
        """After the worker thread is done with ``reads`` (or never ran them): give back the
        descriptors they held, keep those they opened, forget the files that were gone."""
        for read in reads:
            if read.held is not None:
                read.held.users -= 1
                if read.held.dropped and read.held.users == 0:
                    _close_fd(read.held.fd)
                read.held = None
            current = self._entries.get(read.key) is read.entry
            if read.gone and current:
                self.forget(read.key)
            if read.new_fd >= 0:
                if current and not read.gone and read.key not in self._open:
                    self._keep(read.key, read.new_fd)
                else:
                    _close_fd(read.new_fd)
                read.new_fd = -1

    def sweep(self) -> int:
        """Close the descriptors of files diskcache has deleted since they were opened, and
        forget those entries; the number closed."""
        self.learned_since_sweep = 0
        gone = []
        for key, held in self._open.items():
            try:
                if os.fstat(held.fd).st_nlink == 0:
                    gone.append(key)
            except OSError:
                gone.append(key)
        for key in gone:
            self.forget(key)
        return len(gone)

    def close(self) -> None:
        """Close every descriptor (the loop has ended: no job holds one)."""
        for key in list(self._open):
            self._close(key)
        self._entries.clear()
        if self.dir_fd >= 0:
            _close_fd(self.dir_fd)
            self.dir_fd = -1

    def _keep(self, key: str, fd: int) -> _Open:
        held = self._open[key] = _Open(fd)
        while len(self._open) > self._max_open:
            self._close(next(iter(self._open)))
        return held

    def _close(self, key: str) -> None:
        held = self._open.pop(key, None)
        if held is None:
            return
        if held.users:
            held.dropped = True  # the last job to give it back closes it
        else:
            _close_fd(held.fd)


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def read_blocking(dir_fd: int, reads: Sequence[FileRead], check: Callable[[bytes], str]) -> None:
    """Worker thread: perform ``reads`` (see FileRead), touching nothing but them.

    Files not open yet are opened first, and every file is advised WILLNEED before the first
    read, so that their I/O overlaps. ``check`` gives a whole chunk's fs-verity digest (for
    ``whole`` reads: a chunk that does not match is reported gone)."""
    for read in reads:
        if read.fd < 0:
            try:
                read.new_fd = read.fd = os.open(read.entry.name, _OPEN_FLAGS, dir_fd=dir_fd)
            except OSError:
                read.gone = True
                continue
        if read.advise or len(reads) > 1:
            whole = read.whole or read.advise
            length = read.size if whole else len(read.dest)
            with contextlib.suppress(OSError):
                os.posix_fadvise(read.fd, 0 if whole else read.offset, length, _WILLNEED)
        if read.advise:
            read.done = True
    for read in reads:
        if read.gone or read.advise:
            continue
        try:
            if read.whole:
                data = os.pread(read.fd, read.size, 0)
                if len(data) != read.size or check(data) != read.verity:
                    read.gone = True
                    continue
                read.data = data
            else:
                wanted = len(read.dest)
                got = os.preadv(read.fd, [read.dest], read.offset)
                while 0 < got < wanted:  # a pread may stop early; a second one tells EOF
                    more = os.preadv(read.fd, [read.dest[got:]], read.offset + got)
                    if more == 0:
                        break
                    got += more
                if got != wanted:
                    read.gone = True
                    continue
        except OSError as exc:
            log.debug("reading chunk file %s failed: %s", read.entry.name, exc)
            read.gone = True
            continue
        read.done = True


_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)
