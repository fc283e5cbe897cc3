"""Whole blobs kept under the cache directory (``layers/``), named by digest.

Two kinds land here: plain layers converted into local zstd:chunked blobs at mount time, and
whole blobs a pull-through proxy sent in answer to a Range request. A blob gets its final name
only by an atomic rename, after its digest was checked, so a reader never sees a partial one.
It is also a byte source (lazyfs/model/bytesource.py): chunks read from it are verified by the
resolver like any others.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio.to_thread

from lazyfs.errors import CacheError, NotFoundError
from lazyfs.localfiles import AtomicFile
from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange


class LocalBlobs:
    def __init__(self, directory: Path, staging_dir: Path) -> None:
        self.directory = directory
        self._staging_dir = staging_dir

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
        return AtomicFile(final)

    def adopt(self, path: Path, blob: Digest) -> None:
        """Move the verified file ``path`` (on this file system) into place as ``blob``."""
        final = self.path(blob)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, final)  # atomic: a half-written blob never has the final name
        except OSError as exc:
            raise CacheError(f"cannot store blob {blob} in {self.directory}: {exc}") from exc

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

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]:
        return await anyio.to_thread.run_sync(self._read, blob, list(ranges))

    def _read(self, blob: Digest, ranges: list[ByteRange]) -> list[bytes]:
        try:
            with self.path(blob).open("rb") as file:
                return [os.pread(file.fileno(), rng.length, rng.start) for rng in ranges]
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {blob} is not in {self.directory}") from exc
