"""The cache's size bound, stored with the cache (``bound.json``), not taken from the last mount.

The bound covers everything lazyfs writes under the cache directory (docs/reliability.md, "The
cache bound"): chunks, the metadata store, local whole blobs, scratch space, logs and state
files. An open that names no bound uses the stored one; one that names a different bound
replaces it (atomically, so a reader sees the old file or the new one). A cache written before
the file existed keeps the bound its chunk store was last opened with.
"""

from __future__ import annotations

import json
from pathlib import Path

from lazyfs.errors import CacheError
from lazyfs.localfiles import AtomicFile

DEFAULT_BOUND_BYTES = 10 << 30
MAX_BOUND_BYTES = (1 << 63) - 1


def read_bound(path: Path) -> int | None:
    """The stored bound, or None if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CacheError(f"cannot read the cache bound {path}: {exc.strerror}") from exc
    try:
        value = json.loads(data)["size_limit_bytes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(
            f"{path} is not a lazyfs cache bound (remove it, or pass --cache-size)"
        ) from exc
    if type(value) is not int or not 0 < value <= MAX_BOUND_BYTES:
        raise CacheError(f"{path}: size_limit_bytes must be an integer in 1..{MAX_BOUND_BYTES}")
    return value


def write_bound(path: Path, size_limit_bytes: int) -> None:
    if not 0 < size_limit_bytes <= MAX_BOUND_BYTES:
        raise CacheError(
            f"a cache bound must be in 1..{MAX_BOUND_BYTES} bytes, got {size_limit_bytes}"
        )
    data = json.dumps({"size_limit_bytes": size_limit_bytes}).encode() + b"\n"
    with AtomicFile(path, f"cache bound {path}") as out:
        out.write(data)
        out.commit()


def settle_bound(path: Path, wanted: int | None, legacy: int | None) -> int:
    """The bound in force: ``wanted`` if given (stored if it differs), else the stored one,
    else ``legacy`` (what an older cache's chunk store kept), else the default; stored."""
    try:
        stored = read_bound(path)
    except CacheError:
        if wanted is None:
            raise
        stored = None  # an explicit bound replaces a broken file
    bound = wanted if wanted is not None else stored
    if bound is None:
        bound = legacy if legacy is not None and legacy > 0 else DEFAULT_BOUND_BYTES
    if bound != stored:
        write_bound(path, bound)
    return bound
