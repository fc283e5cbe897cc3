"""What the cache directory takes on disk, as the bound counts it (docs/reliability.md).

The two diskcache stores report their own volume (SQLite pages plus value files). Everything
else under the cache directory is found by a walk: local blobs (evictable), and what is never
evicted: scratch space and blobs being written, logs, state files, the stores' WAL files and
their directories. The walk is cheap (it skips the stores' value files) but not free, so a
result is reused for up to ``max_age_s`` unless this process changed the blobs meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.cache.layout import CacheLayout

_WALK_MAX_AGE_S = 1.0
_BLOB_FOLDERS = ("sha256", "sha512")


@dataclass(frozen=True)
class OtherUsage:
    blob_count: int
    blob_bytes: int  # local whole blobs: evicted before chunks
    other_bytes: int  # never evicted


@dataclass(frozen=True)
class CacheTotals:
    chunk_store_bytes: int  # diskcache's volume of the chunk store: its SQLite pages and files
    meta_bytes: int
    blob_bytes: int
    other_bytes: int

    @property
    def counted_bytes(self) -> int:
        return self.chunk_store_bytes + self.meta_bytes + self.blob_bytes + self.other_bytes


class OtherFiles:
    """Usage outside the two stores, walked at most once per ``max_age_s``; thread-safe."""

    def __init__(self, layout: CacheLayout, max_age_s: float = _WALK_MAX_AGE_S) -> None:
        self._layout = layout
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._last: tuple[float, int, OtherUsage] | None = None  # when, blobs.changed, usage

    def usage(self, blobs_changed: int, *, fresh: bool = False) -> OtherUsage:
        now = time.monotonic()
        with self._lock:
            last = self._last
        if (
            not fresh
            and last is not None
            and last[1] == blobs_changed
            and now - last[0] < self._max_age_s
        ):
            return last[2]
        found = walk(self._layout)
        with self._lock:
            self._last = (now, blobs_changed, found)
        return found


def walk(layout: CacheLayout) -> OtherUsage:
    stores = {layout.chunks_dir, layout.meta_dir}
    blob_dirs = {layout.blobs_dir / name for name in _BLOB_FOLDERS}
    blob_count = blob_bytes = other = 0
    for root, dirs, files in os.walk(layout.root):
        here = Path(root)
        other += _size(here)
        if here in stores:
            # Value files and the database are in the store's volume; its subdirectories are
            # not, nor its WAL and shared memory, which change with every write (``wal_bytes``).
            other += sum(_size(here / name) for name in dirs)
            dirs.clear()
            continue
        for name in files:
            size = _size(here / name)
            if here in blob_dirs and not name.startswith("."):
                blob_count += 1
                blob_bytes += size
            else:
                other += size
    return OtherUsage(blob_count, blob_bytes, other)


def wal_bytes(layout: CacheLayout) -> int:
    """The stores' WAL and shared-memory files now (SQLite checkpoints the WAL every 1000
    pages, so it stays below about 4 MiB each)."""
    return sum(
        _size(store / f"cache.db{suffix}")
        for store in (layout.chunks_dir, layout.meta_dir)
        for suffix in ("-wal", "-shm")
    )


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size  # apparent size, as du -b counts it
    except OSError:
        return 0
