"""The compute-heavy half of writing a layer: zstd frames and digests of ranges of the tar.

A :class:`Batch` names ranges of the tar file; :func:`compute_batch` reads them and returns
their frames and digests. It depends on nothing but the tar's bytes and the batch, so it runs
the same in the writer's process or in a worker process (``workers.py``), and the blob is the
same whichever process computed which batch.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import fastcdc
import zstandard

from lazyfs.errors import LayoutError, TocError
from lazyfs.formats.chunked.tarsplit import Crc64
from lazyfs.model.verity import (
    BLOCK_SIZE_BYTES,
    HASH_SIZE_BYTES,
    VerityHasher,
    format_verity,
    fsverity_digest,
)

# What an op asks for. Ops are plain (kind, tar offset, length) tuples: batches cross a pipe.
RAW = 0  # a frame only: headers, padding, trailer
CHUNK = 1  # a frame, and the chunk's sha256, fs-verity digest and all-zero flag
SOLE_CHUNK = 2  # as CHUNK, for a file that is one chunk: also the file's CRC64
FILE = 3  # no frame: sha256, fs-verity digest and CRC64 of a whole multi-chunk file
# A whole file of at most ``CUT_MAX_BYTES``: its chunk boundaries (fastcdc) are found here, then
# each chunk is as CHUNK (SOLE_CHUNK if there is one) and, for several, the file as FILE. This
# takes the chunking out of the writer's serial part, and reads the file once.
CUT_FILE = 4
CUT_MAX_BYTES = 2 << 20  # one fastcdc pass over the file is then ``cut_points``' one window

Op = tuple[int, int, int]

_STREAM_BYTES = 4 << 20  # a FILE op outside the batch's range is read in pieces of this size
_ZERO_BLOCK = bytes(BLOCK_SIZE_BYTES)
# The fs-verity descriptor (lazyfs/model/verity.py): version, hash algorithm, log2 block size,
# salt size, reserved, data size, root hash, salt, reserved.
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")


class ChunkDigests(NamedTuple):
    sha256: str  # "sha256:<hex>"
    verity: str  # "sha256:<hex>" of the fs-verity digest
    zeros: bool
    crc64: bytes  # the file's tar-split CRC64 for SOLE_CHUNK ops, else b""


class FileDigests(NamedTuple):
    sha256: str
    verity: str
    crc64: bytes


class CutDigests(NamedTuple):
    """A CUT_FILE op's: ``(start in the file, length, digests)`` of each chunk, and the file's
    digests if it has several chunks (one chunk's digests are the file's, CRC64 included)."""

    chunks: tuple[tuple[int, int, ChunkDigests], ...]
    file: FileDigests | None


Digests = ChunkDigests | FileDigests | CutDigests | None


@dataclass(frozen=True)
class Batch:
    """Ops on one range of the tar. RAW and CHUNK ops tile ``[start, end)``, read at once."""

    tar_path: str
    start: int
    end: int
    ops: tuple[Op, ...]
    zstd_level: int
    chunk_bytes: tuple[int, int, int] = (0, 0, 0)  # fastcdc's min, average, max: CUT_FILE ops


@dataclass(frozen=True)
class BatchResult:
    """The frames of the RAW and CHUNK ops, in op order; one ``digests`` item per op."""

    frames: bytes
    frame_sizes: tuple[int, ...]
    digests: tuple[Digests, ...]


def compute_batch(batch: Batch) -> BatchResult:
    """Read the batch's ranges of the tar and compute every op; LayoutError if it is unreadable."""
    try:
        fd = os.open(batch.tar_path, os.O_RDONLY)
    except OSError as exc:
        raise LayoutError(f"cannot read the layer tar {batch.tar_path}: {exc.strerror}") from exc
    try:
        return _compute(fd, batch)
    except OSError as exc:
        raise LayoutError(f"cannot read the layer tar {batch.tar_path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _compute(fd: int, batch: Batch) -> BatchResult:
    data = memoryview(read_exact(fd, batch.start, batch.end - batch.start))
    compress = _compressor(batch.zstd_level).compress
    frames: list[bytes] = []
    digests: list[Digests] = []
    for kind, offset, length in batch.ops:
        if kind == FILE:
            if batch.start <= offset and offset + length <= batch.end:
                start = offset - batch.start
                digests.append(_file_digests([data[start : start + length]]))
            else:
                digests.append(_file_digests(_read_pieces(fd, offset, length)))
            continue
        start = offset - batch.start
        piece = data[start : start + length]
        if kind == CUT_FILE:
            digests.append(_cut_file(piece, batch.chunk_bytes, compress, frames))
            continue
        frames.append(compress(piece))
        if kind == RAW:
            digests.append(None)
        else:
            crc64 = _crc64(piece) if kind == SOLE_CHUNK else b""
            digests.append(_chunk_digests(piece, crc64))
    sizes = tuple(len(frame) for frame in frames)
    return BatchResult(b"".join(frames), sizes, tuple(digests))


def _cut_file(
    data: memoryview,
    chunk_bytes: tuple[int, int, int],
    compress: Callable[[memoryview], bytes],
    frames: list[bytes],
) -> CutDigests:
    """A CUT_FILE op: the file's chunks' frames go to ``frames``; their digests are returned."""
    cuts = [(chunk.offset, chunk.length) for chunk in fastcdc.fastcdc(data, *chunk_bytes)]
    if len(cuts) == 1:  # its digests are the file's, hashed once
        frames.append(compress(data))
        return CutDigests(((0, len(data), _chunk_digests(data, _crc64(data))),), None)
    chunks = []
    for start, length in cuts:
        piece = data[start : start + length]
        frames.append(compress(piece))
        chunks.append((start, length, _chunk_digests(piece, b"")))
    return CutDigests(tuple(chunks), _file_digests([data]))


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """``length`` bytes of ``fd`` at ``offset``; TocError if the file ends before."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    buffer = bytearray(length)  # a short read: finish it in a buffer
    buffer[: len(data)] = data
    read_into(fd, memoryview(buffer)[len(data) :], offset + len(data))
    return bytes(buffer)


def read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; TocError if the file ends before."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if not count:
            raise TocError(f"layer tar ends at {offset + done}, before {offset + len(view)}")
        done += count


def _read_pieces(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """A long range of the file in reads of a bounded size, into one reused buffer."""
    buffer = memoryview(bytearray(min(_STREAM_BYTES, length)))
    end = offset + length
    while offset < end:
        view = buffer[: min(len(buffer), end - offset)]
        read_into(fd, view, offset)
        yield view
        offset += len(view)


def _chunk_digests(piece: memoryview, crc64: bytes) -> ChunkDigests:
    return ChunkDigests(
        "sha256:" + hashlib.sha256(piece).hexdigest(),
        format_verity(verity_digest(piece)),
        _all_zero(piece),
        crc64,
    )


def verity_digest(data: memoryview) -> bytes:
    """``fsverity_digest(data)`` (no salt) of one buffer, with less work per call than the
    streaming hasher: a layer has 10^4 chunks, and this is a tenth of a chunk's CPU."""
    size = len(data)
    if not size:
        return fsverity_digest(data)
    sha256 = hashlib.sha256
    whole = size - size % BLOCK_SIZE_BYTES
    level = b"".join(
        [sha256(data[i : i + BLOCK_SIZE_BYTES]).digest() for i in range(0, whole, BLOCK_SIZE_BYTES)]
    )
    if whole < size:  # the last block, zero-padded without a copy
        last = sha256(data[whole:])
        last.update(_ZERO_BLOCK[: whole + BLOCK_SIZE_BYTES - size])
        level += last.digest()
    while len(level) > HASH_SIZE_BYTES:
        level += _ZERO_BLOCK[: -len(level) % BLOCK_SIZE_BYTES]
        view = memoryview(level)
        level = b"".join(
            [
                sha256(view[i : i + BLOCK_SIZE_BYTES]).digest()
                for i in range(0, len(view), BLOCK_SIZE_BYTES)
            ]
        )
    descriptor = _DESCRIPTOR.pack(1, 1, 12, 0, 0, size, level, b"")  # version, SHA-256, 4 KiB
    return sha256(descriptor).digest()


def _file_digests(pieces: Iterable[memoryview]) -> FileDigests:
    sha256 = hashlib.sha256()
    verity = VerityHasher()
    crc = Crc64()
    for piece in pieces:
        sha256.update(piece)
        verity.update(piece)
        crc.update(piece)
    return FileDigests("sha256:" + sha256.hexdigest(), format_verity(verity.digest()), crc.digest())


def _crc64(piece: memoryview) -> bytes:
    crc = Crc64()
    crc.update(piece)
    return crc.digest()


def _all_zero(piece: memoryview) -> bool:
    if piece[0] != 0 or piece[-1] != 0:  # the common case, decided without a copy
        return False
    return bool(piece == bytes(len(piece)))


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe: one per thread (and level).
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zstd", None)
    if compressors is None:
        compressors = _local.zstd = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor
