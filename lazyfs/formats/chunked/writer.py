"""Write one uncompressed tar layer as a zstd:chunked layer with fs-verity digests.

The tar bytes pass through unchanged (headers, padding and trailer included), so the layer
decompresses to exactly the input tar and its diff_id does not change. Layout of the blob:

- every run of non-payload tar bytes (headers, padding, trailer) is one zstd frame;
- every payload chunk (content-defined, see ChunkingConfig) is one zstd frame, so a reader can
  fetch and decompress just that chunk;
- then three skippable frames: the TOC, the tar-split, and the 64-byte footer.

Hashing and compression run on a small thread pool (hashlib and zstandard release the GIL);
results are consumed in order, so the output is byte-identical on every run.
See docs/format.md for the canonical choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

import fastcdc
import zstandard

from lazyfs.config import ChunkingConfig
from lazyfs.errors import TocError
from lazyfs.formats.chunked.ranks import mark_entries
from lazyfs.formats.chunked.tarsplit import Crc64, TarSplitWriter, trailer_segments
from lazyfs.formats.chunked.toc import (
    TARSPLIT_POSITION_ANNOTATION,
    TOC_CHECKSUM_ANNOTATION,
    TOC_POSITION_ANNOTATION,
    VERITY_ANNOTATION,
    VERITY_ANNOTATION_VALUE,
    BlobSection,
    ChunkRef,
    Footer,
    Toc,
    TocEntry,
    format_tarsplit_position,
    format_toc_position,
    skippable_frame,
    with_chunk_fields,
)
from lazyfs.model.digest import Digest
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.verity import VerityHasher, format_verity, fsverity_digest

_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}
_WORKERS = 2
_MAX_IN_FLIGHT = 64


@dataclass
class LayerStats:
    """What one converted layer holds; reported by ``lazyfs convert --json``."""

    tar_bytes: int = 0
    file_count: int = 0
    chunk_count: int = 0
    payload_bytes: int = 0
    unique_payload_bytes: int = 0
    seen_chunks: set[str] = field(default_factory=set, repr=False)

    def add_chunk(self, verity: str, size: int) -> None:
        self.chunk_count += 1
        self.payload_bytes += size
        if verity not in self.seen_chunks:
            self.seen_chunks.add(verity)
            self.unique_payload_bytes += size

    @property
    def dedup_ratio(self) -> float:
        return self.payload_bytes / self.unique_payload_bytes if self.unique_payload_bytes else 1.0


@dataclass(frozen=True)
class ChunkedLayer:
    """The result of writing one layer."""

    digest: Digest
    size: int
    diff_id: Digest
    annotations: dict[str, str]
    toc: Toc
    stats: LayerStats


@dataclass
class _SplitItem:
    """A tar-split entry: a segment (raw bytes) or a file (name, size, CRC)."""

    is_file: bool
    name: bytes = b""
    size: int = 0
    raw: bytes = b""
    crc64: bytes = b""


def _tar_split_json(items: list[_SplitItem]) -> bytes:
    writer = TarSplitWriter()
    for item in items:
        if item.is_file:
            writer.add_file(item.name, item.size, item.crc64 or Crc64().digest())
        else:
            writer.add_segment(item.raw)
    return writer.getvalue()


def _raw_name(member: tarfile.TarInfo, view: memoryview) -> bytes:
    """The member name as its header spells it; tarfile drops a directory's trailing slash."""
    name = member.name.encode("utf-8", "surrogateescape")
    if member.isdir() and not name.endswith(b"/"):
        header = bytes(view[member.offset_data - 512 : member.offset_data - 412]).rstrip(b"\0")
        if header.endswith(b"/") or member.pax_headers.get("path", "").endswith("/"):
            name += b"/"
    return name


@dataclass(frozen=True)
class _ChunkResult:
    frame: bytes
    sha256: str
    verity: str
    zeros: bool


@dataclass(frozen=True)
class _FileResult:
    sha256: str
    verity: str
    crc64: bytes


class _BlobOutput:
    """The output blob: counts offsets and hashes everything written."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> tuple[int, int]:
        start = self.offset
        self._out.write(data)
        self._hash.update(data)
        self.offset += len(data)
        return start, self.offset

    def digest(self) -> Digest:
        return Digest("sha256", self._hash.hexdigest())


class _Jobs:
    """Ordered results from a thread pool with a bounded number of jobs in flight."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._queue: deque[tuple[Future[object], Callable[[object], None]]] = deque()

    def submit(self, work: Callable[[], object], then: Callable[[object], None]) -> None:
        self._queue.append((self._pool.submit(work), then))
        while len(self._queue) > _MAX_IN_FLIGHT:
            self._finish_one()

    def drain(self) -> None:
        while self._queue:
            self._finish_one()

    def abandon(self) -> None:
        """Wait for every job and drop it, results and all (after a failure)."""
        while self._queue:
            future, _then = self._queue.popleft()
            future.exception()

    def _finish_one(self) -> None:
        future, then = self._queue.popleft()
        then(future.result())


class LayerWriter:
    """Converts one tar (already decompressed, on disk) into a zstd:chunked blob."""

    def __init__(
        self,
        config: ChunkingConfig,
        on_progress: Callable[[int], None] | None,
        prefetch: AccessProfile | None = None,
    ) -> None:
        self._config = config
        self._prefetch = prefetch
        self._on_progress = on_progress or (lambda _done: None)
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.stats = LayerStats()
        # One slot per tar member, in tar order; a file's slot is filled when its hash job ends.
        self._entries: list[list[TocEntry]] = []
        # tar-split items in tar order; a file's CRC is filled in when its hash job finishes.
        self._split_items: list[_SplitItem] = []

    def write(self, tar_path: Path, out: BinaryIO, diff_id: Digest) -> ChunkedLayer:
        blob = _BlobOutput(out)
        with (
            tar_path.open("rb") as tar_file,
            _map_file(tar_file) as tar_bytes,
            ThreadPoolExecutor(_WORKERS, thread_name_prefix="lazyfs-convert") as pool,
        ):
            view = memoryview(tar_bytes)
            jobs = _Jobs(pool)
            try:
                self._write_payloads(tar_path, view, blob, jobs)
            finally:
                jobs.abandon()  # on failure: no job may still hold a slice of the mapping
                view.release()
            self.stats.tar_bytes = len(tar_bytes)
        return self._finish(blob, diff_id)

    def _write_payloads(
        self, tar_path: Path, view: memoryview, blob: _BlobOutput, jobs: _Jobs
    ) -> None:
        position = padding = 0
        for member in _iter_members(tar_path):
            entry = _entry_for(member)
            self._split_items.append(
                _SplitItem(False, raw=bytes(view[position : member.offset_data]))
            )
            self._submit_raw(view[position : member.offset_data], blob, jobs)
            payload_size = member.size if entry.type == "reg" else 0
            end = member.offset_data + payload_size
            split_file = _SplitItem(True, _raw_name(member, view), payload_size)
            self._split_items.append(split_file)
            self._submit_file(entry, split_file, view[member.offset_data : end], blob, jobs)
            position, padding = end, -payload_size % 512
            self._on_progress(position)
        for piece in trailer_segments(bytes(view[position:]), padding):
            self._split_items.append(_SplitItem(False, raw=piece))
        self._submit_raw(view[position:], blob, jobs)
        jobs.drain()
        self._on_progress(len(view))

    def _submit_raw(self, raw: memoryview, blob: _BlobOutput, jobs: _Jobs) -> None:
        if len(raw):
            jobs.submit(
                lambda: self._compress(raw), lambda frame: _discard(blob.write(_as_bytes(frame)))
            )

    def _submit_file(
        self,
        entry: TocEntry,
        split: _SplitItem,
        payload: memoryview,
        blob: _BlobOutput,
        jobs: _Jobs,
    ) -> None:
        slot = [entry]
        self._entries.append(slot)
        if entry.type != "reg":
            return
        self.stats.file_count += 1
        pieces = list(self._split(payload))
        chunks: list[ChunkRef] = []
        for start, piece in pieces:
            self._submit_chunk(start, piece, chunks, blob, jobs)
        # A one-chunk file's digests are its chunk's: hash it once, not twice.
        whole_file = len(pieces) > 1
        jobs.submit(
            lambda: _file_job(payload, whole_file),
            lambda result: self._fill_slot(slot, split, _as_file(result), chunks, blob.offset),
        )

    def _submit_chunk(
        self, start: int, piece: memoryview, chunks: list[ChunkRef], blob: _BlobOutput, jobs: _Jobs
    ) -> None:
        def place(result: object) -> None:
            chunks.append(self._place_chunk(_as_chunk(result), start, len(piece), blob))

        jobs.submit(lambda: self._chunk_job(piece), place)

    def _split(self, payload: memoryview) -> Iterator[tuple[int, memoryview]]:
        if len(payload) <= self._config.min_chunk_bytes:
            if len(payload):
                yield 0, payload
            return
        cfg = self._config
        for chunk in fastcdc.fastcdc(
            payload, cfg.min_chunk_bytes, cfg.avg_chunk_bytes, cfg.max_chunk_bytes
        ):
            yield chunk.offset, payload[chunk.offset : chunk.offset + chunk.length]

    def _chunk_job(self, piece: memoryview) -> _ChunkResult:
        zeros = _all_zero(piece)
        return _ChunkResult(
            frame=self._compress(piece),
            sha256="sha256:" + hashlib.sha256(piece).hexdigest(),
            verity=format_verity(fsverity_digest(piece)),
            zeros=zeros,
        )

    def _place_chunk(
        self, result: _ChunkResult, start: int, size: int, blob: _BlobOutput
    ) -> ChunkRef:
        blob_start, blob_end = blob.write(result.frame)
        self.stats.add_chunk(result.verity, size)
        return ChunkRef(
            start, size, blob_start, blob_end, result.sha256, result.verity, result.zeros
        )

    def _fill_slot(
        self,
        slot: list[TocEntry],
        split: _SplitItem,
        file: _FileResult,
        chunks: list[ChunkRef],
        end_offset: int,
    ) -> None:
        split.crc64 = file.crc64
        if chunks and not file.sha256:  # one chunk: the file's digests are the chunk's
            file = _FileResult(chunks[0].sha256, chunks[0].verity, file.crc64)
        slot[:] = _file_entries(slot[0], file, chunks, end_offset)

    def _compress(self, data: memoryview | bytes) -> bytes:
        # ZstdCompressor objects are not thread-safe: one per worker thread.
        key = threading.get_ident()
        compressor = self._compressors.get(key)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._config.zstd_level)
            self._compressors[key] = compressor
        return compressor.compress(data)

    def _finish(self, blob: _BlobOutput, diff_id: Digest) -> ChunkedLayer:
        level = self._config.zstd_level
        tar_split_json = _tar_split_json(self._split_items)
        tar_split = zstandard.ZstdCompressor(level=level).compress(tar_split_json)
        entries = tuple(entry for slot in self._entries for entry in slot)
        if self._prefetch is not None:
            entries = mark_entries(entries, self._prefetch)
        toc = Toc(entries, "sha256:" + hashlib.sha256(tar_split).hexdigest())
        toc_json = toc.to_json()
        toc_compressed = zstandard.ZstdCompressor(level=level).compress(toc_json)
        toc_start, _ = blob.write(skippable_frame(toc_compressed))
        toc_section = BlobSection(toc_start + 8, len(toc_compressed), len(toc_json))
        split_start, _ = blob.write(skippable_frame(tar_split))
        split_section = BlobSection(split_start + 8, len(tar_split), len(tar_split_json))
        blob.write(skippable_frame(Footer(toc_section, split_section).to_bytes()))
        annotations = {
            TOC_CHECKSUM_ANNOTATION: "sha256:" + hashlib.sha256(toc_compressed).hexdigest(),
            TOC_POSITION_ANNOTATION: format_toc_position(toc_section),
            TARSPLIT_POSITION_ANNOTATION: format_tarsplit_position(split_section),
            VERITY_ANNOTATION: VERITY_ANNOTATION_VALUE,
        }
        return ChunkedLayer(blob.digest(), blob.offset, diff_id, annotations, toc, self.stats)


def write_chunked_layer(
    tar_path: Path,
    out_path: Path,
    config: ChunkingConfig,
    diff_id: Digest | None = None,
    on_progress: Callable[[int], None] | None = None,
    prefetch: AccessProfile | None = None,
) -> ChunkedLayer:
    """Convert the uncompressed tar at ``tar_path`` into a zstd:chunked blob at ``out_path``.

    ``diff_id`` is the sha256 of the tar, when the caller already computed it while writing it.
    ``prefetch``: an access profile whose ranks go into the TOC.
    """
    diff_id = diff_id or _sha256_file(tar_path)
    with out_path.open("wb") as out:
        return LayerWriter(config, on_progress, prefetch).write(tar_path, out, diff_id)


def _file_job(payload: memoryview, whole_file: bool) -> _FileResult:
    """The tar-split CRC; and the whole-file digests when the file has several chunks."""
    crc = Crc64()
    crc.update(payload)
    if not whole_file:
        return _FileResult(sha256="", verity="", crc64=crc.digest())
    hasher = VerityHasher()
    hasher.update(payload)
    return _FileResult(
        sha256="sha256:" + hashlib.sha256(payload).hexdigest(),
        verity=format_verity(hasher.digest()),
        crc64=crc.digest(),
    )


def _iter_members(tar_path: Path) -> Iterator[tarfile.TarInfo]:
    try:
        with tarfile.open(tar_path, mode="r:", errors="surrogateescape") as archive:
            yield from archive
    except tarfile.TarError as exc:
        raise TocError(f"layer is not a valid tar stream: {exc}") from exc


def _entry_for(member: tarfile.TarInfo) -> TocEntry:
    if member.type == tarfile.GNUTYPE_SPARSE or member.issparse():
        raise TocError(f"sparse file {member.name!r} is not supported")
    kind = _TAR_TYPES.get(member.type)
    if kind is None:
        raise TocError(f"unsupported tar entry type {member.type!r} for {member.name!r}")
    pax = member.pax_headers
    return TocEntry(
        type=kind,
        name=_text(member.name),
        link_name=_text(member.linkname) if kind in ("symlink", "hardlink") else "",
        mode=member.mode,
        size=member.size if kind == "reg" else 0,
        uid=member.uid,
        gid=member.gid,
        modtime=_rfc3339(pax.get("mtime"), member.mtime),
        accesstime=_rfc3339(pax.get("atime"), None),
        changetime=_rfc3339(pax.get("ctime"), None),
        dev_major=member.devmajor if kind in ("char", "block") else 0,
        dev_minor=member.devminor if kind in ("char", "block") else 0,
        xattrs=_xattrs(pax),
    )


def _text(name: str) -> str:
    # Names that are not UTF-8 arrive with surrogate escapes; JSON needs real text.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _file_entries(
    entry: TocEntry, file: _FileResult, chunks: list[ChunkRef], end_offset: int
) -> list[TocEntry]:
    """The reg entry (and chunk entries) of a file, in the upstream layout."""
    if not chunks:
        return [entry]
    head = replace(
        entry,
        digest=file.sha256,
        verity=file.verity,
        offset=chunks[0].blob_offset,
        end_offset=end_offset,
    )
    if len(chunks) == 1:
        return [replace(head, chunk_verity=chunks[0].verity)]
    entries = [with_chunk_fields(head, chunks[0], _chunk_type(chunks[0]))]
    for chunk in chunks[1:]:
        bare = TocEntry(type="chunk", name=entry.name)
        entries.append(with_chunk_fields(bare, chunk, _chunk_type(chunk)))
    return entries


def _discard(_value: object) -> None:
    return None


def _xattrs(pax: Mapping[str, str]) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {
        _text(key[len(prefix) :]): value.encode("utf-8", "surrogateescape")
        for key, value in pax.items()
        if key.startswith(prefix)
    }


def _rfc3339(exact: str | None, fallback: float | None) -> str:
    """Format a tar timestamp as Go's RFC3339Nano in UTC."""
    try:
        seconds = Decimal(exact) if exact is not None else None
    except InvalidOperation:
        seconds = None
    if seconds is None:
        if fallback is None:
            return ""
        seconds = Decimal(int(fallback))
    try:
        whole = int(seconds.to_integral_value(rounding="ROUND_FLOOR"))
        nanos = int((seconds - whole) * 1_000_000_000)
        stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (ValueError, OverflowError, ArithmeticError) as exc:
        raise TocError(f"tar timestamp {exact or fallback!r} is out of range") from exc
    fraction = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{stamp}{fraction}Z"


def _chunk_type(chunk: ChunkRef) -> str:
    return "zeros" if chunk.zeros else ""


def _all_zero(piece: memoryview) -> bool:
    if piece[0] != 0 or piece[-1] != 0:  # the common case, decided without a copy
        return False
    return bool(piece == bytes(len(piece)))


def _as_bytes(value: object) -> bytes:
    assert isinstance(value, bytes)
    return value


def _as_chunk(value: object) -> _ChunkResult:
    assert isinstance(value, _ChunkResult)
    return value


def _as_file(value: object) -> _FileResult:
    assert isinstance(value, _FileResult)
    return value


def _sha256_file(path: Path) -> Digest:
    hasher = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            hasher.update(block)
    return Digest("sha256", hasher.hexdigest())


class _map_file:
    """mmap a file read-only; an empty file maps to b''."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._map: mmap.mmap | None = None

    def __enter__(self) -> bytes | mmap.mmap:
        if self._file.seek(0, 2) == 0:
            return b""
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def __exit__(self, *_exc: object) -> None:
        if self._map is None:
            return
        # A traceback may still hold a slice; then the map closes when it is collected.
        with contextlib.suppress(BufferError):
            self._map.close()
