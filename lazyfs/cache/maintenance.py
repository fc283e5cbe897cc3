"""``lazyfs cache du|gc|verify|clear``: look after a cache directory.

Everything here blocks; it runs in the CLI's process, next to a service that may be using the
same cache (diskcache is safe across processes). What would pull bytes from under a running
service (``clear``, and removing scratch space in ``gc``) is refused while one owns the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lazyfs.cache.layout import CacheLayout
from lazyfs.cache.store import ChunkCache
from lazyfs.errors import CacheError, LazyfsError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.verity import format_verity, fsverity_digest

_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class CacheUsage:
    directory: str
    chunks: int
    chunk_bytes: int  # the chunk store: its chunk files and its SQLite database
    metadata_bytes: int
    local_blobs: int
    local_blob_bytes: int
    other_bytes: int  # scratch, blobs being written, logs, state files, WAL files
    counted_bytes: int  # what the bound counts: the four above
    disk_bytes: int  # what du(1) would say of the whole directory (blocks allocated)
    size_limit_bytes: int
    pinned_images: int
    pinned_chunks: int
    pinned_bytes: int  # uncompressed bytes of the pinned chunks, cached or not
    pinned_cached_bytes: int  # of those, the ones in the cache now
    pins: list[dict[str, object]]


@dataclass(frozen=True)
class GcReport:
    chunks_evicted: int
    blobs_evicted: int
    scratch_entries_removed: int


@dataclass(frozen=True)
class VerifyReport:
    chunks_checked: int
    chunks_dropped: int
    blobs_checked: int
    blobs_dropped: int


def usage(cache: ChunkCache) -> CacheUsage:
    totals = cache.totals(fresh=True)
    images, pinned = cache.pinned()
    return CacheUsage(
        str(cache.directory),
        cache.chunk_count,
        totals.chunk_store_bytes,
        totals.meta_bytes,
        len(cache.blobs.files()),
        totals.blob_bytes,
        totals.other_bytes,
        totals.counted_bytes,
        disk_bytes(cache.directory),
        cache.size_limit_bytes,
        pinned.images,
        pinned.chunks,
        pinned.bytes,
        pinned.cached_bytes,
        [asdict(image) for image in images],
    )


def verify(cache: ChunkCache) -> VerifyReport:
    """Re-hash every cached chunk against its key and every local blob against its name; drop
    what fails (it is fetched again, verified, when next needed)."""
    checked = dropped = 0
    for key in cache.chunk_keys():
        data = cache.get_chunks([key])[0]
        checked += 1
        if data is None or format_verity(fsverity_digest(data)) != key:
            cache.drop_chunk(key)
            dropped += 1
    blobs_checked = blobs_dropped = 0
    for path, digest in _local_blobs(cache.layout):
        blobs_checked += 1
        if _file_digest(path, digest.algorithm) != digest:
            _remove(path)
            blobs_dropped += 1
    return VerifyReport(checked, dropped, blobs_checked, blobs_dropped)


def gc(cache: ChunkCache) -> GcReport:
    """Remove scratch space left by interrupted conversions, then evict down to the bound."""
    removed = 0
    try:
        with _service_absent(cache.layout, "gc"):
            removed = _remove_scratch(cache.layout)
    except UsageError:  # a running service may be converting a layer there right now
        pass
    chunks, blobs = cache.evict_to_bound()
    return GcReport(chunks, blobs, removed)


def _remove_scratch(layout: CacheLayout) -> int:
    removed = 0
    staging = layout.staging_dir
    for entry in staging.iterdir() if staging.is_dir() else ():
        _remove(entry)
        removed += 1
    for path in layout.blobs_dir.rglob(".*.part"):
        _remove(path)
        removed += 1
    return removed


def clear(cache: ChunkCache) -> None:
    """Drop every chunk, every piece of metadata, every pin and every local blob."""
    with _service_absent(cache.layout, "clear"):
        cache.clear()
        if cache.layout.blobs_dir.exists():
            _remove(cache.layout.blobs_dir)


def disk_bytes(directory: Path) -> int:
    """Bytes allocated on disk under ``directory``, as du(1) counts them."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


@contextlib.contextmanager
def _service_absent(layout: CacheLayout, what: str) -> Iterator[None]:
    """Hold the cache's service lock, so no service starts meanwhile; refuse if one runs."""
    try:
        handle = layout.service_lock.open("ab")
    except OSError as exc:
        raise CacheError(f"cannot open {layout.service_lock}: {exc.strerror}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"a lazyfs service is using {layout.root}: stop it before `lazyfs cache {what}`"
            ) from None
        yield


def _local_blobs(layout: CacheLayout) -> Iterator[tuple[Path, Digest]]:
    for algorithm in ("sha256", "sha512"):
        folder = layout.blobs_dir / algorithm
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            try:
                yield path, Digest.parse(f"{algorithm}:{path.name}")
            except LazyfsError:
                continue  # not a blob (a temp file): gc's business


def _file_digest(path: Path, algorithm: str) -> Digest:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as source:
        while block := source.read(_READ_BYTES):
            hasher.update(block)
    return Digest(algorithm, hasher.hexdigest())


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CacheError(f"cannot remove {path}: {exc.strerror}") from exc
