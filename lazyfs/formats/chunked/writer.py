"""Write one uncompressed tar layer as a zstd:chunked layer with fs-verity digests.

The tar bytes pass through unchanged (headers, padding and trailer included), so the layer
decompresses to exactly the input tar and its diff_id does not change. (With an access profile,
``lazyfs convert`` first writes the tar in the profile-first order, ``order.py``, and gives
that tar to the writer.) Layout of the blob:

- every run of non-payload tar bytes (headers, padding, trailer) is one zstd frame;
- every payload chunk (content-defined, see ChunkingConfig) is one zstd frame, so a reader can
  fetch and decompress just that chunk;
- then three skippable frames: the TOC, the tar-split, and the 64-byte footer.

How the work is shared: this process reads the tar headers (``members``), finds the chunk
boundaries (``chunker``) of files over 2 MiB (smaller ones are chunked by their batch) and
groups the frames and digests to compute into batches of about 4 MiB of tar; the batches run
in worker processes, one per CPU (``frames``, ``workers``), and their results are placed in
the blob in tar order. The blob depends only on the tar and on the
chunking and level settings, never on the number of workers. See docs/format.md for the
canonical choices and docs/chunking.md for the measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from lazyfs.config import ChunkingConfig
from lazyfs.errors import CacheError, LayoutError
from lazyfs.formats.chunked.chunker import WINDOW_BYTES, cut_points
from lazyfs.formats.chunked.frames import (
    CHUNK,
    CUT_FILE,
    CUT_MAX_BYTES,
    FILE,
    RAW,
    SOLE_CHUNK,
    Batch,
    BatchResult,
    ChunkDigests,
    CutDigests,
    FileDigests,
    Op,
    read_exact,
    read_into,
)
from lazyfs.formats.chunked.members import entry_fields, iter_members, raw_name
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
    chunk_ref,
    entries_json,
    format_tarsplit_position,
    format_toc_position,
    skippable_frame,
    trusted_entry,
)
from lazyfs.formats.chunked.toc import toc_json as toc_json_of
from lazyfs.formats.chunked.workers import BatchRunner
from lazyfs.model.digest import Digest
from lazyfs.model.profiles import AccessProfile

# About this much tar per batch: large enough that a batch's trip to a worker (~0.2 ms) is
# noise, small enough that the batches in flight stay a few tens of MiB.
BATCH_BYTES = 4 << 20
# ... and at most this many ops, so that a batch of tiny files stays a small message.
_MAX_BATCH_OPS = 512
# Near the end of the tar, batches shrink to an eighth of what is left (not below this), so
# that the last batches end together on every core instead of one core finishing a 4 MiB
# batch alone (~80 ms on one core, measured).
_TAIL_BATCH_BYTES = 256 << 10
_TAIL_SHARE = 8
# A worker costs ~40 ms to start, what converting ~4 MB costs: small layers get fewer.
BYTES_PER_WORKER = 8 << 20
_BLOCK_BYTES = 512
_ENCODE_ENTRIES = 256  # TOC entries encoded at once
_EMPTY_CRC64 = Crc64().digest()


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


# slots, and not frozen: a layer makes tens of thousands of these, and frozen inits are slow.
@dataclass(slots=True)
class _Member:
    """A tar member until its TOC entries and tar-split lines are written, in tar order."""

    fields: dict[str, Any]  # of its TOC entry, but digests and offsets (``entry_fields``)
    headers: bytes  # the tar bytes before its payload: one tar-split segment
    name: bytes  # its raw name, for the tar-split
    size: int  # of its payload (regular files only)
    chunks: list[ChunkRef] = field(default_factory=list)
    digests: FileDigests | None = None
    end_offset: int = 0  # in the blob, after the frame of its last chunk
    placed_bytes: int = 0  # of its payload, in chunks whose frames are in the blob

    @property
    def complete(self) -> bool:
        return self.placed_bytes == self.size


@dataclass(slots=True)
class _ChunkTarget:
    member: _Member
    start: int  # in the file
    size: int


@dataclass(slots=True)
class _CutTarget:
    member: _Member


# What each op of a batch is for: None for a RAW op, the member for a FILE op.
_Target = _ChunkTarget | _CutTarget | _Member | None


@dataclass(slots=True)
class _BatchTag:
    targets: list[_Target]
    end: int  # tar bytes done once this batch is placed


class _BlobOutput:
    """The output blob: counts offsets and hashes everything written."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes) -> tuple[int, int]:
        start = self.offset
        try:
            self._out.write(data)
        except OSError as exc:
            name = getattr(self._out, "name", "")
            raise CacheError(f"cannot write the layer blob {name}: {exc.strerror}") from exc
        self._hash.update(data)
        self.offset += len(data)
        return start, self.offset

    def digest(self) -> Digest:
        return Digest("sha256", self._hash.hexdigest())


class _BatchPlan:
    """Collects ops in tar order and cuts them into batches for ``submit``."""

    def __init__(
        self,
        tar_path: str,
        zstd_level: int,
        batch_bytes: int,
        submit: Callable[[Batch, _BatchTag], None],
        tar_bytes: int,
        chunk_bytes: tuple[int, int, int],
    ) -> None:
        self._tar_path = tar_path
        self._level = zstd_level
        self._chunk_bytes = chunk_bytes
        self._batch_bytes = batch_bytes
        self._tar_bytes = tar_bytes
        self._tail_from = tar_bytes - _TAIL_SHARE * batch_bytes  # where batches start to shrink
        self._submit = submit
        self._ops: list[Op] = []
        self._targets: list[_Target] = []
        self._start: int | None = None
        self._end = 0

    def add(self, kind: int, offset: int, length: int, target: _Target) -> None:
        self._ops.append((kind, offset, length))
        self._targets.append(target)
        if kind != FILE:  # RAW and CHUNK ops tile the batch's range of the tar
            if self._start is None:
                self._start = offset
            self._end = offset + length
            size = self._end - self._start
            if size >= self._batch_bytes or (
                self._end > self._tail_from and size >= self._tail_bytes()
            ):
                self.flush()
                return
        if len(self._ops) >= _MAX_BATCH_OPS:
            self.flush()

    def _tail_bytes(self) -> int:
        return max(_TAIL_BATCH_BYTES, (self._tar_bytes - self._end) // _TAIL_SHARE)

    def flush(self) -> None:
        if not self._ops:
            return
        start = self._end if self._start is None else self._start
        ops = tuple(self._ops)
        batch = Batch(self._tar_path, start, self._end, ops, self._level, self._chunk_bytes)
        tag = _BatchTag(self._targets, self._end)
        self._ops, self._targets, self._start = [], [], None
        self._submit(batch, tag)


class LayerWriter:
    """Converts one tar (already decompressed, on disk) into a zstd:chunked blob.

    ``batch_bytes`` and ``bytes_per_worker`` tune how work is shared (tests make them small);
    they never change the blob.
    """

    def __init__(
        self,
        config: ChunkingConfig,
        on_progress: Callable[[int], None] | None,
        prefetch: AccessProfile | None = None,
        *,
        batch_bytes: int = BATCH_BYTES,
        bytes_per_worker: int = BYTES_PER_WORKER,
    ) -> None:
        self._config = config
        self._prefetch = prefetch
        self._on_progress = on_progress or (lambda _done: None)
        self._batch_bytes = batch_bytes
        self._bytes_per_worker = bytes_per_worker
        self.stats = LayerStats()
        # Members whose entries are not final yet, oldest first; then what they became. Both
        # are written as results arrive, so that little is left for the end.
        self._unfinished: deque[_Member] = deque()
        self._entries: list[TocEntry] = []
        # Without a profile, entries are final once made: they are encoded as they come, in
        # groups, so that little of the TOC's JSON is left for the end, when no worker has work.
        self._encode_entries = prefetch is None
        self._entries_encoded = 0
        self._toc_pieces: list[bytes] = []
        self._tar_split = TarSplitWriter()
        self._trailer: list[bytes] = []
        self._window = bytearray()  # payload bytes read to find chunk boundaries
        self._done = 0

    def worker_count(self, tar_bytes: int) -> int:
        """Processes a tar of ``tar_bytes`` is converted with (1: this one alone)."""
        wanted = self._config.workers or available_cpus()
        return max(1, min(wanted, tar_bytes // max(1, self._bytes_per_worker)))

    def write(self, tar_path: Path, out: BinaryIO, diff_id: Digest) -> ChunkedLayer:
        blob = _BlobOutput(out)
        try:
            fd = os.open(tar_path, os.O_RDONLY)
        except OSError as exc:
            raise LayoutError(f"cannot read the layer tar {tar_path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            with BatchRunner[_BatchTag](self.worker_count(size)) as runner:

                def submit(batch: Batch, tag: _BatchTag) -> None:
                    for done_tag, result in runner.submit(batch, tag):
                        self._place(done_tag, result, blob)

                config = self._config
                chunk_bytes = (
                    config.min_chunk_bytes,
                    config.avg_chunk_bytes,
                    config.max_chunk_bytes,
                )
                plan = _BatchPlan(
                    str(tar_path), config.zstd_level, self._batch_bytes, submit, size, chunk_bytes
                )
                self._scan(tar_path, fd, size, plan)
                plan.flush()
                for done_tag, result in runner.drain():
                    self._place(done_tag, result, blob)
        except OSError as exc:  # the blob's own write errors are CacheErrors already
            raise LayoutError(f"cannot read the layer tar {tar_path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        self._finish_members()
        self.stats.tar_bytes = size
        self._on_progress(size)
        return self._finish(blob, diff_id)

    def _scan(self, tar_path: Path, fd: int, size: int, plan: _BatchPlan) -> None:
        """Plan every op of the tar, member by member."""
        position = padding = 0
        readahead = _Readahead(fd)
        for info in iter_members(tar_path):
            readahead.reach(info.offset_data + info.size)
            fields = entry_fields(info)
            headers = read_exact(fd, position, info.offset_data - position)
            if headers:
                plan.add(RAW, position, len(headers), None)
            is_file = fields["type"] == "reg"
            payload_size = fields["size"] if is_file else 0
            member = _Member(fields, headers, raw_name(info, headers), payload_size)
            self._unfinished.append(member)
            if is_file:
                self.stats.file_count += 1
                self._plan_file(member, fd, info.offset_data, plan)
            position = info.offset_data + payload_size
            padding = -payload_size % _BLOCK_BYTES
        rest = read_exact(fd, position, size - position)
        self._trailer = trailer_segments(rest, padding)
        if rest:
            plan.add(RAW, position, len(rest), None)

    def _plan_file(self, member: _Member, fd: int, offset: int, plan: _BatchPlan) -> None:
        size = member.size
        if 0 < size <= self._config.min_chunk_bytes:  # one chunk, as cut_points says: quicker
            plan.add(SOLE_CHUNK, offset, size, _ChunkTarget(member, 0, size))
            return
        if size <= CUT_MAX_BYTES:  # chunked by whichever process computes its batch
            plan.add(CUT_FILE, offset, size, _CutTarget(member))
            return

        def read(start: int, length: int) -> memoryview:
            if len(self._window) < length:
                self._window = bytearray(max(length, WINDOW_BYTES))
            view = memoryview(self._window)[:length]
            read_into(fd, view, offset + start)
            return view

        cuts = cut_points(size, read, self._config)
        first = next(cuts, None)
        if first is None:
            return  # an empty file: no chunk, no digests
        if first[1] == size:  # one chunk: its digests are the file's, hashed once
            plan.add(SOLE_CHUNK, offset, size, _ChunkTarget(member, 0, size))
            return
        plan.add(FILE, offset, size, member)
        plan.add(CHUNK, offset, first[1], _ChunkTarget(member, 0, first[1]))
        for start, length in cuts:
            plan.add(CHUNK, offset + start, length, _ChunkTarget(member, start, length))

    def _place(self, tag: _BatchTag, result: BatchResult, blob: _BlobOutput) -> None:
        """Write a batch's frames, in tar order, and record what they hold."""
        offset, _ = blob.write(result.frames)
        sizes = iter(result.frame_sizes)
        for target, digests in zip(tag.targets, result.digests, strict=True):
            if target is None:
                offset += next(sizes)
            elif isinstance(target, _Member):
                assert isinstance(digests, FileDigests)
                target.digests = digests
            elif isinstance(target, _CutTarget):
                assert isinstance(digests, CutDigests)
                member = target.member
                if digests.file is not None:
                    member.digests = digests.file
                for start, length, chunk in digests.chunks:
                    end = offset + next(sizes)
                    self._place_chunk(_ChunkTarget(member, start, length), chunk, offset, end)
                    offset = end
            else:
                assert isinstance(digests, ChunkDigests)
                end = offset + next(sizes)
                self._place_chunk(target, digests, offset, end)
                offset = end
        self._finish_members()
        self._done = max(self._done, tag.end)
        self._on_progress(self._done)

    def _place_chunk(self, target: _ChunkTarget, chunk: ChunkDigests, start: int, end: int) -> None:
        member = target.member
        ref = chunk_ref(
            target.start, target.size, start, end, chunk.sha256, chunk.verity, chunk.zeros, 0, 0
        )
        member.chunks.append(ref)
        member.end_offset = end
        member.placed_bytes += target.size
        if chunk.crc64:  # a one-chunk file
            member.digests = FileDigests(chunk.sha256, chunk.verity, chunk.crc64)
        self.stats.add_chunk(chunk.verity, target.size)

    def _finish_members(self) -> None:
        """Write the entries and tar-split lines of the oldest members that are complete."""
        while self._unfinished and self._unfinished[0].complete:
            member = self._unfinished.popleft()
            self._entries.extend(_member_entries(member))
            crc64 = member.digests.crc64 if member.digests else _EMPTY_CRC64
            self._tar_split.add_segment(member.headers)
            self._tar_split.add_file(member.name, member.size, crc64)
        if self._encode_entries and len(self._entries) - self._entries_encoded >= _ENCODE_ENTRIES:
            self._encode_new_entries()

    def _encode_new_entries(self) -> None:
        self._toc_pieces.append(entries_json(self._entries[self._entries_encoded :]))
        self._entries_encoded = len(self._entries)

    def _finish(self, blob: _BlobOutput, diff_id: Digest) -> ChunkedLayer:
        level = self._config.zstd_level
        for piece in self._trailer:
            self._tar_split.add_segment(piece)
        tar_split_json = self._tar_split.getvalue()
        tar_split = zstandard.ZstdCompressor(level=level).compress(tar_split_json)
        entries = tuple(self._entries)
        if self._prefetch is not None:
            entries = mark_entries(entries, self._prefetch)
        toc = Toc(entries, "sha256:" + hashlib.sha256(tar_split).hexdigest())
        if self._encode_entries:
            self._encode_new_entries()
            toc_json = toc_json_of(toc, self._toc_pieces)
        else:
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


class _Readahead:
    """Asks the kernel to read the tar ahead of the scan, so that header reads (tarfile's, one
    small read per member) and the batches' reads find it cached. A tar just written may not
    be: this machine, for one, drops clean page cache within seconds."""

    _AHEAD_BYTES = 32 << 20

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._asked = 0
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def reach(self, offset: int) -> None:
        """The scan will soon read up to ``offset``."""
        if offset + self._AHEAD_BYTES // 2 <= self._asked:
            return
        start, self._asked = self._asked, offset + self._AHEAD_BYTES
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, start, self._asked - start, os.POSIX_FADV_WILLNEED)


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
    try:
        out = out_path.open("wb")
    except OSError as exc:
        raise CacheError(f"cannot write the layer blob {out_path}: {exc.strerror}") from exc
    with out:
        return LayerWriter(config, on_progress, prefetch).write(tar_path, out, diff_id)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _member_entries(member: _Member) -> list[TocEntry]:
    """A member's TOC entries: for a file, its reg entry and chunk entries, upstream's layout.

    Each entry is built once, with all its fields, by ``trusted_entry`` (a layer has 10^4).
    """
    fields, chunks, digests = member.fields, member.chunks, member.digests
    if not chunks or digests is None:
        return [trusted_entry(fields)]
    first = chunks[0]
    head = fields | {
        "digest": digests.sha256,
        "verity": digests.verity,
        "offset": first.blob_offset,
        "end_offset": member.end_offset,
        "chunk_verity": first.verity,
    }
    if len(chunks) == 1:
        return [trusted_entry(head)]
    head |= {
        "chunk_size": first.size,
        "chunk_offset": first.file_offset,
        "chunk_digest": first.sha256,
        "chunk_type": _chunk_type(first),
    }
    name = fields["name"]
    return [trusted_entry(head)] + [
        trusted_entry(
            {
                "type": "chunk",
                "name": name,
                "offset": chunk.blob_offset,
                "chunk_size": chunk.size,
                "chunk_offset": chunk.file_offset,
                "chunk_digest": chunk.sha256,
                "chunk_type": _chunk_type(chunk),
                "chunk_verity": chunk.verity,
            }
        )
        for chunk in chunks[1:]
    ]


def _chunk_type(chunk: ChunkRef) -> str:
    return "zeros" if chunk.zeros else ""


def _sha256_file(path: Path) -> Digest:
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as source:
            while block := source.read(1 << 20):
                hasher.update(block)
    except OSError as exc:
        raise LayoutError(f"cannot read the layer tar {path}: {exc.strerror}") from exc
    return Digest("sha256", hasher.hexdigest())
