"""What lives where under a cache directory: the only module that names paths under it.

```
CACHE_DIR/
  chunks/    diskcache: verified chunks by fs-verity digest, LRU-evicted (store.py)
  meta/      diskcache: manifests, configs, TOCs, tag -> digest, aliases; never evicted
  layers/    whole blobs by digest: plain layers converted locally, and whole blobs a
             pull-through proxy sent for a Range request (blobs.py)
    staging/ scratch space of a conversion in progress, on the same file system as layers/
  logs/      the log of the mount service that owns this cache (and of older daemons)
  service.json  where that service listens (socket, root, pid): how clients find it
  service.lock  flock held by that service for its whole life: one service per cache
  bound.json    the cache's size bound, covering everything above (bound.py)
```

Pins live in a table of their own inside the chunk store's SQLite database (pins.py), so that
every process that evicts sees them in the same transaction as the rows it deletes.
"""

from __future__ import annotations

from pathlib import Path

from lazyfs.model.record import Record


class CacheLayout(Record):  # a record, not a dataclass: `lazyfs mount` finds its service here
    _FIELDS = ("root",)
    __slots__ = _FIELDS
    root: Path

    def __init__(self, root: Path) -> None:
        self._set("root", root)

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "layers"  # named before it held proxy blobs too; kept for old caches

    @property
    def staging_dir(self) -> Path:
        return self.blobs_dir / "staging"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def service_log(self) -> Path:
        return self.logs_dir / "service.log"

    @property
    def service_record(self) -> Path:
        return self.root / "service.json"

    @property
    def service_lock(self) -> Path:
        return self.root / "service.lock"

    @property
    def bound_file(self) -> Path:
        return self.root / "bound.json"
