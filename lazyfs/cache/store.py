"""The local cache: verified chunks by fs-verity digest, and image metadata for offline mounts.

- Chunks are content-addressed by the fs-verity digest of their uncompressed bytes, so identical
  chunks of any file, layer or image are stored and fetched once, by every mount that shares the
  cache directory (diskcache serialises writers through SQLite).
- ``put_chunk`` is only called with bytes the resolver has verified. Writes are atomic: diskcache
  commits a row only after its value file is complete, so a killed daemon leaves at worst an
  orphan file, never an entry that reads as valid.
- The chunk cache is bounded by ``size_limit_bytes`` with least-recently-used eviction.
- Metadata (manifests, configs, TOCs, tag -> digest) lives in a separate store that is never
  evicted by chunk traffic; it is what makes a remount work with the registry down.

Where each store lives is cache/layout.py's business; metadata keys come from cache/keys.py.
All methods block: callers run them in worker threads (see docs/concurrency.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import diskcache

from lazyfs.cache.blobs import LocalBlobs
from lazyfs.cache.keys import alias_key
from lazyfs.cache.layout import CacheLayout
from lazyfs.errors import CacheError
from lazyfs.model.verity import format_verity, fsverity_digest

_META_SIZE_LIMIT_BYTES = 1 << 40  # metadata is small; it must not be evicted by chunk traffic


class ChunkCache:
    """Verified chunk bytes keyed by their fs-verity digest (``sha256:<hex>``)."""

    def __init__(
        self, directory: Path, size_limit_bytes: int | None, *, verify_reads: bool = False
    ) -> None:
        """``size_limit_bytes`` None keeps the bound stored with the cache (diskcache keeps
        its settings in the cache's own database)."""
        self.directory = directory
        self.layout = CacheLayout(directory)
        self.blobs = LocalBlobs(self.layout.blobs_dir, self.layout.staging_dir)
        self._verify_reads = verify_reads
        try:
            directory.mkdir(parents=True, exist_ok=True)
            bound = {} if size_limit_bytes is None else {"size_limit": size_limit_bytes}
            self._chunks = diskcache.Cache(
                str(self.layout.chunks_dir),
                **bound,
                eviction_policy="least-recently-used",
                cull_limit=10,
                disk_min_file_size=1 << 15,
            )
            self._meta = diskcache.Cache(
                str(self.layout.meta_dir), size_limit=_META_SIZE_LIMIT_BYTES, eviction_policy="none"
            )
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot open cache at {directory}: {exc}") from exc

    def get_chunk(self, verity: str) -> bytes | None:
        data = self._get(self._chunks, verity)
        if (
            data is not None
            and self._verify_reads
            and format_verity(fsverity_digest(data)) != verity
        ):
            self._chunks.delete(verity)  # bit rot or tampering on disk: drop it and refetch
            return None
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
        try:
            self._chunks.set(verity, data)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot write chunk {verity} to the cache: {exc}") from exc

    def put_chunks(
        self, chunks: Sequence[tuple[str, bytes]], aliases: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Store verified chunks (and sha256 -> fs-verity aliases) in one transaction each."""
        try:
            if chunks:
                with self._chunks.transact():
                    for verity, data in chunks:
                        self._chunks.set(verity, data)
            if aliases:
                with self._meta.transact():
                    for sha256, verity in aliases:
                        self._meta.set(alias_key(sha256), verity.encode())
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot write {len(chunks)} chunks to the cache: {exc}") from exc

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

    def put_meta(self, key: str, data: bytes) -> None:
        try:
            self._meta.set(key, data)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot write {key} to the cache: {exc}") from exc

    @property
    def chunk_bytes(self) -> int:
        return int(self._chunks.volume())

    @property
    def size_limit_bytes(self) -> int:
        return int(self._chunks.size_limit)

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

    def evict_to_bound(self) -> int:
        """Evict least recently used chunks until the bound holds; the number evicted."""
        try:
            return int(self._chunks.cull())
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot evict chunks: {exc}") from exc

    def clear(self) -> None:
        """Drop every chunk and every piece of metadata."""
        try:
            self._chunks.clear()
            self._meta.clear()
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot clear the cache: {exc}") from exc

    def close(self) -> None:
        self._chunks.close()
        self._meta.close()

    @staticmethod
    def _get(store: diskcache.Cache, key: str) -> bytes | None:
        try:
            value = store.get(key)
        except (OSError, diskcache.Timeout) as exc:
            raise CacheError(f"cannot read {key} from the cache: {exc}") from exc
        return value if isinstance(value, bytes) else None
