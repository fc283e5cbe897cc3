"""The local cache: verified chunks by fs-verity digest, and image metadata for offline mounts.

- Chunks are content-addressed by the fs-verity digest of their uncompressed bytes, so identical
  chunks of any file, layer or image are stored and fetched once, by every mount that shares the
  cache directory (diskcache serialises writers through SQLite).
- ``put_chunk`` is only called with bytes the resolver has verified. Writes are atomic: diskcache
  commits a row only after its value file is complete, so a killed daemon leaves at worst an
  orphan file, never an entry that reads as valid.
- One bound covers everything under the cache directory (bound.py: stored with the cache).
  Eviction is lazyfs code, not diskcache's cull (whose chunk store is opened with eviction
  policy ``none``): when a write takes the total past the bound, local blobs no process holds go
  first, least recently used (blobs.py), then chunks, least recently used, never a pinned one
  (pins.py). Metadata, scratch space, logs and state files count but are never evicted.
- Every chunk is a file of its own (``disk_min_file_size`` 0), named by when it was written
  (``_ChunkDisk``: the chunks of one fetch share a directory), so that a warm read can be one
  ``preadv`` of just the bytes asked for (chunkfiles.py: ``ChunkCache.files``). Reads through
  ``load_chunks`` and the warm path do not write SQLite: they note what they read, and the next
  ``put_chunks`` or ``flush_reads`` writes the access times of all of them in one transaction.
  Older caches keep their small chunks inside SQLite; those are read through the store.
- Metadata (manifests, configs, TOCs, tag -> digest) lives in a separate store that is never
  evicted by chunk traffic; it is what makes a remount work with the registry down.

Where each store lives is cache/layout.py's business; metadata keys come from cache/keys.py.
All methods block: callers run them in worker threads (see docs/concurrency.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from lazyfs.cache import pins
from lazyfs.cache.blobs import LocalBlobs
from lazyfs.cache.bound import read_bound, settle_bound
from lazyfs.cache.chunkfiles import ChunkFiles
from lazyfs.cache.keys import LOCAL_LAYER_PREFIX, alias_key
from lazyfs.cache.layout import CacheLayout
from lazyfs.cache.usage import CacheTotals, OtherFiles, wal_bytes
from lazyfs.errors import CacheError, PinTooLargeError
from lazyfs.model.digest import Digest
from lazyfs.model.verity import format_verity, fsverity_digest

log = logging.getLogger(__name__)

_META_SIZE_LIMIT_BYTES = 1 << 40  # metadata is small; it must not be evicted by chunk traffic
_CHUNK_FILE_MIN_BYTES = 0  # every chunk in a file of its own: the warm path preads it
_FILES_PER_DIRECTORY = 4096
_SQL_BATCH = 500  # keys per IN (...) query, well under SQLite's limit on parameters
# diskcache's row modes (diskcache.core): bytes inline in SQLite, or in a file of their own.
_MODE_RAW = 1
_MODE_BINARY = 2
# The WAL counts against the bound too: checkpoint it every 256 pages (1 MiB; SQLite's default
# is 4 MiB) and truncate it to 1 MiB after, in every connection (diskcache applies sqlite_*
# settings as pragmas to each one).
_WAL_SETTINGS = {"sqlite_wal_autocheckpoint": 256, "sqlite_journal_size_limit": 1 << 20}
_EVICT_BATCH = 256
_WARN_EVERY_S = 60.0  # rows per eviction transaction
_LRU_INDEX = "CREATE INDEX IF NOT EXISTS Cache_access_time ON Cache (access_time)"  # diskcache's
# The row diskcache's ``set`` inserts for a str key whose bytes are in a file: raw key, stored
# and accessed now, no expiry or tag, mode binary, no inline value.
_INSERT_FILE_ROW = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size,"
    f" mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, NULL, ?, {_MODE_BINARY}, ?, NULL)"
)
_CREATE_ATTEMPTS = 10  # as diskcache: another writer may remove an emptied directory meanwhile


class _ChunkDisk(diskcache.Disk):  # type: ignore[misc]  # diskcache has no type hints
    """diskcache's Disk, placing chunk files by when they were written: the chunks of one
    fetch, which are read together later, share a directory (a few thousand files each).
    diskcache's own names spread files over 65,536 random directories, so that after a
    page-cache drop every chunk cost a directory block and an inode block of its own before
    its data; here the chunks read together share them. Only new files are placed so; the
    rows name their files, so caches written before read as they are."""

    def __init__(self, directory: str, **settings: Any) -> None:
        super().__init__(directory, **settings)
        self._session = os.urandom(4).hex()  # per handle: writers in other processes differ
        self._count = itertools.count()

    def filename(self, key: Any = diskcache.UNKNOWN, value: Any = diskcache.UNKNOWN) -> Any:
        number = next(self._count)  # atomic: writer threads share this handle
        name = f"w{self._session}-{number // _FILES_PER_DIRECTORY:06x}/{os.urandom(12).hex()}.val"
        return name, os.path.join(self._directory, name)

    def write_new(self, data: bytes) -> str:
        """Write ``data`` to a new file of its own; its name (relative to the directory).

        What ``store`` does for bytes, with less work per chunk: diskcache writes a value as
        the lines of a BytesIO (a verified chunk has hundreds) and tries makedirs first each
        time; here one write, and makedirs only when the directory is missing (diskcache's
        ``remove`` deletes directories that become empty, so it may be missing again)."""
        name: str
        path: str
        name, path = self.filename()
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileNotFoundError:
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise
                os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            self.remove(name)
            raise
        os.close(fd)
        return name


@dataclass(frozen=True)
class LoadedChunk:
    """A chunk read through the store: its bytes, and the file that holds them (relative to
    the chunk directory; None for an old chunk kept inside SQLite)."""

    data: bytes
    file_name: str | None


class ChunkCache:
    """Verified chunk bytes keyed by their fs-verity digest (``sha256:<hex>``)."""

    def __init__(
        self, directory: Path, size_limit_bytes: int | None, *, verify_reads: bool = False
    ) -> None:
        """``size_limit_bytes`` None keeps the bound stored with the cache (bound.py); another
        value replaces it."""
        self.directory = directory
        self.layout = CacheLayout(directory)
        self.blobs = LocalBlobs(self.layout.blobs_dir, self.layout.staging_dir, self._converted)
        self._verify_reads = verify_reads
        try:
            directory.mkdir(parents=True, exist_ok=True)
            existed = (self.layout.chunks_dir / "cache.db").exists()
            self._chunks = diskcache.Cache(
                str(self.layout.chunks_dir),
                eviction_policy="none",  # lazyfs evicts (``_enforce_bound``), honouring pins
                cull_limit=0,
                disk=_ChunkDisk,
                disk_min_file_size=_CHUNK_FILE_MIN_BYTES,
                **_WAL_SETTINGS,
            )
            legacy = int(self._chunks.size_limit) if existed else None  # diskcache kept it
            self._chunks._sql(_LRU_INDEX)
            with self._chunks.transact():
                pins.create(self._chunks._con)
            self._meta = diskcache.Cache(
                str(self.layout.meta_dir),
                size_limit=_META_SIZE_LIMIT_BYTES,
                eviction_policy="none",
                **_WAL_SETTINGS,
            )
            self._bound = settle_bound(self.layout.bound_file, size_limit_bytes, legacy)
            self.files = ChunkFiles(self.layout.chunks_dir)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot open cache at {directory}: {exc}") from exc
        self._other = OtherFiles(self.layout)
        self._warned = -_WARN_EVERY_S  # when the bound last could not be met (logged)
        self._bound_stamp = self._bound_file_stamp()
        # Chunks read without a SQLite write, by fs-verity digest: when (time.time()).
        self._reads: dict[str, float] = {}
        self._reads_lock = threading.Lock()

    @property
    def verify_reads(self) -> bool:
        return self._verify_reads

    def get_chunk(self, verity: str) -> bytes | None:
        data = self._get(self._chunks, verity)
        if (
            data is not None
            and self._verify_reads
            and format_verity(fsverity_digest(data)) != verity
        ):
            self._chunks.delete(verity)  # bit rot or tampering on disk: drop it and refetch
            return None
        if data is not None:
            self.note_read(verity)  # diskcache's get no longer writes access times (policy none)
        return data

    def get_chunks(self, verities: Sequence[str | None]) -> list[bytes | None]:
        """``get_chunk`` of each (None for None), in one transaction: with LRU eviction every
        hit updates its access time, and one commit for all is cheaper than one each."""
        try:
            with self._chunks.transact():
                return [self.get_chunk(v) if v is not None else None for v in verities]
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot read {len(verities)} chunks from the cache: {exc}") from exc

    def put_chunk(self, verity: str, data: bytes) -> None:
        """Store verified chunk bytes."""
        self.put_chunks([(verity, data)])

    def put_chunks(
        self, chunks: Sequence[tuple[str, bytes]], aliases: Sequence[tuple[str, str]] = ()
    ) -> dict[str, str]:
        """Store verified chunks (and sha256 -> fs-verity aliases) in one transaction each;
        the file of each stored chunk, once committed (fs-verity digest -> name relative to
        the chunk directory). The access times noted since the last write go in the same
        transaction, before the writes that may evict."""
        names: dict[str, str] = {}
        written: list[str] = []
        try:
            if chunks:
                reads = self._take_reads()
                try:
                    with self._chunks.transact():
                        self._write_reads(reads)
                        names = self._insert_chunks(chunks, written)
                except BaseException:
                    self._give_back_reads(reads)
                    for name in written:  # rolled back: no row names them
                        self._chunks._disk.remove(name)
                    raise
            if aliases:
                with self._meta.transact():
                    for sha256, verity in aliases:
                        self._meta.set(alias_key(sha256), verity.encode())
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot write {len(chunks)} chunks to the cache: {exc}") from exc
        if chunks:
            self._enforce_bound()
        return names

    def _insert_chunks(
        self, chunks: Sequence[tuple[str, bytes]], written: list[str]
    ) -> dict[str, str]:
        """Inside a transaction of the chunk store: each chunk in a file of its own and its
        row, as diskcache's ``set`` makes them, for many chunks at once (one query for the
        rows there are, one insert for all; diskcache's triggers keep its count and size);
        the file of each, by fs-verity digest. ``written`` collects the new files, for the
        caller to remove if the transaction rolls back. A chunk that has a row already (an
        other writer stored it meanwhile) goes through ``set``, which replaces it as before."""
        wanted = dict(chunks)  # a chunk asked for twice in one request is stored once
        present = self._rows(list(wanted))
        now = time.time()
        rows = []
        disk = self._chunks._disk
        for verity, data in wanted.items():
            if verity in present:
                self._chunks.set(verity, data)
                continue
            name = disk.write_new(data)
            written.append(name)
            rows.append((verity, now, now, len(data), name))
        self._chunks._con.executemany(_INSERT_FILE_ROW, rows)
        names = {verity: name for verity, _now, _at, _size, name in rows}
        if len(names) < len(wanted):
            names |= self._file_names([verity for verity in wanted if verity not in names])
        return names

    def load_chunks(self, verities: Sequence[str | None]) -> list[LoadedChunk | None]:
        """The cached chunks (None where missing, or dropped because ``verify_reads`` found
        them changed), with their files, for the resolver: one read-only query, no SQLite
        write. Each hit is noted for its access time (see ``flush_reads``). The chunks' files
        are opened and advised WILLNEED first, then read, so that their I/O overlaps."""
        wanted = [v for v in dict.fromkeys(verities) if v is not None]
        try:
            rows = self._rows(wanted)
            loaded = self._read_rows(rows)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot read {len(wanted)} chunks from the cache: {exc}") from exc
        now = time.time()
        hits: dict[str, LoadedChunk] = {}
        for verity, chunk in loaded.items():
            if self._verify_reads and format_verity(fsverity_digest(chunk.data)) != verity:
                log.warning("cached chunk %s does not match its digest: dropped", verity)
                with contextlib.suppress(CacheError):  # bit rot or tampering: refetch it
                    self.drop_chunk(verity)
                continue
            hits[verity] = chunk
        with self._reads_lock:
            for verity in hits:
                self._reads[verity] = now
        return [hits.get(v) if v is not None else None for v in verities]

    def locate_chunks(self, verities: Sequence[str]) -> dict[str, str]:
        """The files of those of ``verities`` that are cached in files of their own
        (fs-verity digest -> name relative to the chunk directory); one read-only query."""
        try:
            return self._file_names(list(dict.fromkeys(verities)))
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot look up {len(verities)} chunks in the cache: {exc}") from exc

    def note_read(self, verity: str) -> None:
        """``verity`` was read without the store (chunkfiles.py): its access time is written
        with the next ``put_chunks`` or ``flush_reads``. Cheap; safe from any thread."""
        now = time.time()
        with self._reads_lock:
            self._reads[verity] = now

    def flush_reads(self) -> int:
        """Write the access times of the chunks read since the last write, in one
        transaction (least-recently-used eviction orders by them); how many."""
        reads = self._take_reads()
        if not reads:
            return 0
        try:
            with self._chunks.transact():
                self._write_reads(reads)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self._give_back_reads(reads)
            raise CacheError(f"cannot note {len(reads)} chunk reads in the cache: {exc}") from exc
        return len(reads)

    def _take_reads(self) -> dict[str, float]:
        with self._reads_lock:
            reads, self._reads = self._reads, {}
        return reads

    def _give_back_reads(self, reads: dict[str, float]) -> None:
        with self._reads_lock:
            for verity, when in reads.items():
                self._reads[verity] = max(when, self._reads.get(verity, when))

    def _write_reads(self, reads: dict[str, float]) -> None:
        """Inside a transaction of the chunk store: diskcache's own LRU bookkeeping (what its
        ``get`` writes), for many chunks at once."""
        if reads:
            self._chunks._con.executemany(
                "UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1",
                [(when, verity) for verity, when in reads.items()],
            )

    def _rows(self, verities: Sequence[str]) -> dict[str, tuple[int, str | None, Any, int]]:
        """diskcache's rows of ``verities``: mode, file name, inline value, size."""
        found: dict[str, tuple[int, str | None, Any, int]] = {}
        for start in range(0, len(verities), _SQL_BATCH):
            part = list(verities[start : start + _SQL_BATCH])
            marks = ",".join("?" * len(part))
            query = (
                "SELECT key, mode, filename, value, size FROM Cache"
                f" WHERE raw = 1 AND key IN ({marks})"
            )
            for key, mode, filename, value, size in self._chunks._sql(query, part).fetchall():
                found[str(key)] = (int(mode), filename, value, int(size))
        return found

    def _file_names(self, verities: Sequence[str]) -> dict[str, str]:
        return {
            key: name
            for key, (mode, name, _value, _size) in self._rows(verities).items()
            if mode == _MODE_BINARY and name is not None
        }

    def _read_rows(
        self, rows: dict[str, tuple[int, str | None, Any, int]]
    ) -> dict[str, LoadedChunk]:
        loaded: dict[str, LoadedChunk] = {}
        files: list[tuple[str, str, int, int]] = []  # verity, name, fd, size
        try:
            for verity, (mode, name, value, size) in rows.items():
                if mode == _MODE_RAW and isinstance(value, bytes | memoryview):
                    loaded[verity] = LoadedChunk(bytes(value), None)
                elif mode == _MODE_BINARY and name is not None:
                    try:
                        fd = os.open(self.layout.chunks_dir / name, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # evicted since the query
                    files.append((verity, name, fd, size))
                    if len(rows) > 1:
                        with contextlib.suppress(OSError):
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            for verity, name, fd, size in files:
                data = os.pread(fd, size, 0)
                if len(data) == size:
                    loaded[verity] = LoadedChunk(data, name)
        finally:
            for _verity, _name, fd, _size in files:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return loaded

    def has_chunk(self, verity: str) -> bool:
        return verity in self._chunks

    def chunk_keys(self) -> list[str]:
        return [str(key) for key in self._chunks.iterkeys()]

    def get_alias(self, sha256: str) -> str | None:
        """The fs-verity digest of the chunk whose sha256 is ``sha256``, once one was verified.

        Chunks of layers without fs-verity digests (other writers' zstd:chunked, eStargz) are
        still cached by fs-verity digest; this alias is how they are found again."""
        value = self._get(self._meta, alias_key(sha256))
        return value.decode() if value is not None else None

    def put_alias(self, sha256: str, verity: str) -> None:
        self.put_meta(alias_key(sha256), verity.encode())

    def get_meta(self, key: str) -> bytes | None:
        return self._get(self._meta, key)

    def meta_keys(self) -> list[str]:
        """Every metadata key (a bundle inventory lists the blobs: bundle/inventory.py)."""
        return [str(key) for key in self._meta.iterkeys()]

    def put_meta(self, key: str, data: bytes) -> None:
        try:
            self._meta.set(key, data)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot write {key} to the cache: {exc}") from exc
        self._enforce_bound()

    @property
    def chunk_bytes(self) -> int:
        return int(self._chunks.volume())

    @property
    def size_limit_bytes(self) -> int:
        return self._bound

    @property
    def chunk_count(self) -> int:
        return len(self._chunks)

    @property
    def meta_bytes(self) -> int:
        return int(self._meta.volume())

    def drop_chunk(self, verity: str) -> None:
        try:
            self._chunks.delete(verity)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot drop chunk {verity}: {exc}") from exc

    def evict_to_bound(self) -> tuple[int, int]:
        """Evict until the bound holds (``lazyfs cache gc``); (chunks, blobs) evicted."""
        self.flush_reads()
        return self._enforce_bound(fresh=True)

    def totals(self, *, fresh: bool = False) -> CacheTotals:
        """What the bound counts, now (the walk outside the stores may be a second old)."""
        self._follow_bound()
        other = self._other.usage(self.blobs.changed, fresh=fresh)
        try:
            chunk_store, meta = int(self._chunks.volume()), int(self._meta.volume())
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot measure the cache at {self.directory}: {exc}") from exc
        wal = wal_bytes(self.layout)
        return CacheTotals(chunk_store, meta, other.blob_bytes, other.other_bytes + wal)

    def _bound_file_stamp(self) -> int:
        try:
            return os.stat(self.layout.bound_file).st_mtime_ns
        except OSError:
            return 0

    def _follow_bound(self) -> None:
        """Take up a bound another process stored since (``lazyfs serve --cache-size``)."""
        stamp = self._bound_file_stamp()
        if stamp and stamp != self._bound_stamp:
            with contextlib.suppress(CacheError):  # a broken file: keep the bound in force
                self._bound = read_bound(self.layout.bound_file) or self._bound
            self._bound_stamp = stamp

    def _enforce_bound(self, *, fresh: bool = False) -> tuple[int, int]:
        """If the total is past the bound: evict unheld local blobs, then unpinned chunks,
        least recently used first, until it holds; (chunks, blobs) evicted."""
        over = self.totals(fresh=fresh).counted_bytes - self._bound
        if over <= 0:
            return 0, 0
        self.blobs.sweep()  # let go of idle blobs first, so that they can be evicted
        blobs, freed = self.blobs.evict(over)
        chunks = self._evict_chunks(over - freed) if over > freed else 0
        if over > freed and not chunks and time.monotonic() - self._warned > _WARN_EVERY_S:
            self._warned = time.monotonic()
            log.warning(
                "the cache at %s is %d bytes past its bound of %d: what is left is pinned, in "
                "use or never evicted (metadata, scratch)",
                self.directory,
                over - freed,
                self._bound,
            )
        return chunks, blobs

    def _evict_chunks(self, over_bytes: int) -> int:
        """Delete unpinned chunks, least recently used first, until ``over_bytes`` are freed.
        Victims are chosen and deleted in one transaction, so a pin committed by any process
        before it is honoured; files go after the commit, as diskcache's cull does."""
        evicted = freed = 0
        try:
            while freed < over_bytes:
                with self._chunks.transact():
                    con = self._chunks._con
                    rows = con.execute(pins.UNPINNED_LRU, (_EVICT_BATCH,)).fetchall()
                    victims = []
                    for rowid, filename, size in rows:
                        if freed >= over_bytes:
                            break
                        victims.append((rowid, filename))
                        freed += int(size)
                    con.executemany(
                        "DELETE FROM Cache WHERE rowid = ?", [(rowid,) for rowid, _ in victims]
                    )
                for _rowid, filename in victims:
                    if filename is not None:
                        self._chunks._disk.remove(filename)
                evicted += len(victims)
                if len(rows) < _EVICT_BATCH and len(victims) == len(rows):
                    break  # nothing unpinned is left
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot evict chunks from {self.directory}: {exc}") from exc
        return evicted

    def _converted(self, blob: Digest) -> bool:
        """Whether ``blob`` is a plain layer converted here: a mount's only source of it."""
        low = LOCAL_LAYER_PREFIX
        high = low[:-1] + chr(ord(low[-1]) + 1)  # every key with the prefix sorts in [low, high)
        try:
            row = self._meta._sql(
                "SELECT 1 FROM Cache WHERE key >= ? AND key < ? AND value = ? LIMIT 1",
                (low, high, str(blob).encode()),
            ).fetchone()
        except (sqlite3.Error, diskcache.Timeout):
            return True  # when in doubt, keep holding it
        return row is not None

    # ------------------------------------------------------------------------------- pins

    def pin(self, image: pins.PinnedImage, chunks: Sequence[tuple[str, int]]) -> pins.PinTotals:
        """Pin ``chunks`` (fs-verity digest, uncompressed size) for ``image``, replacing an
        earlier pin of it, unless pinned bytes with what is never evicted would pass the
        bound: then nothing is pinned (CacheError)."""
        fixed = self._fixed_bytes()
        try:
            with self._chunks.transact():
                con = self._chunks._con
                pins.replace(con, image, chunks, time.time())
                pinned = pins.pinned_bytes(con)
                if pinned + fixed > self._bound:
                    raise PinTooLargeError(
                        f"cannot pin {image.reference}: pinned chunks would take {pinned} bytes "
                        f"and metadata and state {fixed}, more than the cache's bound of "
                        f"{self._bound} bytes (raise it with --cache-size)"
                    )
                totals = pins.totals(con)
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot pin {image.reference}: {exc}") from exc
        self._enforce_bound()
        return totals

    def unpin(self, reference: str, image: str | None) -> list[str]:
        """Release the pins ``reference`` (or the manifest digest ``image``) names; the
        images released (none: it was not pinned)."""
        try:
            with self._chunks.transact():
                con = self._chunks._con
                found = pins.find(con, reference, image)
                for digest in found:
                    pins.remove_image(con, digest)
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot unpin {reference}: {exc}") from exc
        return found

    def pinned(self) -> tuple[list[pins.PinnedImage], pins.PinTotals]:
        try:
            with self._chunks.transact():
                con = self._chunks._con
                return pins.images(con), pins.totals(con)
        except (sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot read the pins of {self.directory}: {exc}") from exc

    def _fixed_bytes(self) -> int:
        """What the bound counts and eviction never frees: metadata, scratch, logs, state,
        the chunk store's database itself."""
        totals = self.totals(fresh=True)
        return (
            totals.meta_bytes
            + totals.other_bytes
            + max(0, totals.chunk_store_bytes - self.chunk_bytes_stored)
        )

    @property
    def chunk_bytes_stored(self) -> int:
        """Bytes of the chunks themselves (diskcache's running sum of value sizes)."""
        return int(self._chunks.reset("size"))

    def clear(self) -> None:
        """Drop every chunk, every piece of metadata and every pin."""
        try:
            self._chunks.clear()
            self._meta.clear()
            with self._chunks.transact():
                pins.clear(self._chunks._con)
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            raise CacheError(f"cannot clear the cache: {exc}") from exc

    def close(self) -> None:
        """Write the access times still noted, close the warm path's files and the stores
        (after the event loop that read through ``files`` has ended)."""
        try:
            self.flush_reads()
        except CacheError as exc:
            log.warning("%s", exc)
        self.files.close()
        self.blobs.close()
        self._chunks.close()
        self._meta.close()

    @staticmethod
    def _get(store: diskcache.Cache, key: str) -> bytes | None:
        try:
            value = store.get(key)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot read {key} from the cache: {exc}") from exc
        return value if isinstance(value, bytes) else None
