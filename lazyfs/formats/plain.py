"""Decompress a layer blob to its tar, checking both the blob digest and the diff_id.

Blocking code: callers run it in a worker thread (zlib and zstandard release the GIL).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from lazyfs.errors import IntegrityError, TocError
from lazyfs.model.digest import Digest

Compression = Literal["none", "gzip", "zstd"]
_READ_BYTES = 1 << 20


def decompress_layer(
    blob_path: Path,
    compression: Compression,
    blob_digest: Digest,
    tar_path: Path,
    on_progress: Callable[[int], None] | None = None,
) -> Digest:
    """Write the tar inside ``blob_path`` to ``tar_path``; return its sha256 (the diff_id).

    Raises IntegrityError when the blob does not match ``blob_digest``.
    """
    blob_hash = hashlib.sha256()
    tar_hash = hashlib.sha256()
    with blob_path.open("rb") as source, tar_path.open("wb") as out:
        chunks = _hashing_reader(source, blob_hash, on_progress)
        for data in _decompressed(chunks, compression):
            tar_hash.update(data)
            out.write(data)
    actual = Digest("sha256", blob_hash.hexdigest())
    if actual != blob_digest:
        raise IntegrityError(f"layer {blob_digest}", str(blob_digest), str(actual))
    return Digest("sha256", tar_hash.hexdigest())


def _hashing_reader(
    source: BinaryIO, blob_hash: hashlib._Hash, on_progress: Callable[[int], None] | None
) -> Iterator[bytes]:
    done = 0
    while data := source.read(_READ_BYTES):
        blob_hash.update(data)
        done += len(data)
        if on_progress:
            on_progress(done)
        yield data


def _decompressed(chunks: Iterator[bytes], compression: Compression) -> Iterator[bytes]:
    if compression == "none":
        return chunks
    if compression == "gzip":
        return _gunzip(chunks)
    return _unzstd(chunks)


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Inflate concatenated gzip members (pigz and eStargz write many)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        for data in chunks:
            while data:
                yield inflater.decompress(data)
                if not inflater.eof:
                    break
                data = inflater.unused_data
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        yield inflater.flush()
    except zlib.error as exc:
        raise TocError(f"layer is not valid gzip: {exc}") from exc


def _unzstd(chunks: Iterator[bytes]) -> Iterator[bytes]:
    decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    try:
        for data in chunks:
            yield decompressor.decompress(data)
    except zstandard.ZstdError as exc:
        raise TocError(f"layer is not valid zstd: {exc}") from exc
