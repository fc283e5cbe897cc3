"""The data behind the chunk-size defaults (``ChunkingConfig``; docs/chunking.md).

For each fastcdc average size (16K, 32K, 64K, 128K, 256K; min = avg/4, max = avg*4), and for
one frame per whole file (no chunking: the reference row), the same
realistic layer (a deterministic sample of this machine's /usr, as in ``bench convert``) and a
second "version" of it (the same files, 5% of them edited: a third appended to, a third patched in
place, a third with bytes inserted) are converted with ``write_chunked_layer``. Reported:

- chunk count, blob size against zstd -3 of the whole tar (the loss from compressing each chunk
  as its own frame), and the TOC a mount must fetch first;
- dedup between the versions: v2 bytes whose chunk fs-verity digest is in v1, and the compressed
  bytes a client holding v1's chunks fetches for v2, against file-level dedup (whole files
  shared by digest) and against pulling the whole v2 layer;
- over-fetch: compressed bytes fetched (whole chunks, ranges merged as the resolver merges them
  with ``ResolverConfig`` defaults) to read 200 small files whole, 32 random 4 KiB reads of the
  biggest ELF file, and 1 MiB of it sequentially, against the bytes read; and the whole-chunk
  bytes those reads cover (over-fetch before compression).

The model counts what lazyfs asks for; the kernel's read-ahead (1 MiB on a lazyfs mount) can
make real reads larger (``bench mount`` measures real reads).

Run: ``python -m lazyfs.bench.micro chunking [--size-mb 256] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zstandard

from lazyfs.bench.micro.common import (
    KIB,
    MB,
    MIB,
    Report,
    interrupts_as_exceptions,
    mb_per_s,
    print_machine,
    say,
    step,
    work_dir,
)
from lazyfs.bench.micro.inputs import (
    SourceFile,
    composition,
    file_entries,
    sample_files,
    usr_files,
)
from lazyfs.config import ChunkingConfig, ResolverConfig
from lazyfs.convert.imagebuild import (
    Entry,
    file_read_when_written,
    with_parent_dirs,
    write_tar_file,
)
from lazyfs.formats.chunked.toc import (
    TOC_POSITION_ANNOTATION,
    ChunkRef,
    file_chunks,
    group_file_entries,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import ChunkedLayer, write_chunked_layer

AVERAGES_KIB = (16, 32, 64, 128, 256)
WHOLE_FILE = 0  # stands for "no chunking": every file one frame
_HUGE = 1 << 40
EDITED_FRACTION = 0.05
SMALL_FILE_MAX = 64 * KIB
SMALL_FILE_SAMPLE = 200
RANDOM_READS = 32
RANDOM_READ_BYTES = 4 * KIB
SEQUENTIAL_READ_BYTES = 1 * MIB
_SEED = 20240601


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lazyfs.bench.micro chunking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-mb", type=int, default=256, help="MiB of file data (default 256)")
    parser.add_argument(
        "--averages",
        default=",".join(map(str, AVERAGES_KIB)) + ",file",
        help="comma-separated average chunk sizes in KiB; 'file' for one frame per file",
    )
    parser.add_argument("--work-dir", type=Path, help="keep the tars and blobs here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    averages = [WHOLE_FILE if a == "file" else int(a) * KIB for a in args.averages.split(",")]
    busy = print_machine()
    report = Report("chunking: fastcdc average size (min = avg/4, max = avg*4)")
    report.facts["CPU % used by other work at the start"] = round(busy, 1)
    with interrupts_as_exceptions(), work_dir(args.work_dir, "lazyfs-bench-chunking-") as work:
        rows = measure(report, work, args.size_mb * MIB, averages)
    report.print_table()
    print_summary(rows)
    report.facts["summary"] = [row.__dict__ for row in rows]
    report.write_json(args.json)
    return 0


# --- the two versions --------------------------------------------------------------------------


def edited_entries(files: Sequence[SourceFile], seed: int = _SEED) -> tuple[list[Entry], int]:
    """v2: the same files, EDITED_FRACTION of them (by count) edited; (entries, edited count)."""
    rng = random.Random(seed)
    candidates = [i for i, f in enumerate(files) if f.size > 0]
    chosen = set(rng.sample(candidates, max(1, round(EDITED_FRACTION * len(files)))))
    entries: list[Entry] = []
    for index, f in enumerate(files):
        if index not in chosen:
            entries.append(file_read_when_written(f.name, f.path.read_bytes, f.mode))
            continue
        kind = index % 3
        edit_seed = rng.randrange(1 << 30)
        read = _edited_reader(f.path, kind, edit_seed)
        entries.append(file_read_when_written(f.name, read, f.mode))
    return entries, len(chosen)


def _edited_reader(path: Path, kind: int, seed: int) -> Callable[[], bytes]:
    def read() -> bytes:
        data = path.read_bytes()
        rng = random.Random(seed)
        if kind == 0:  # appended: a log, a changelog, a list grows
            return data + rng.randbytes(rng.randint(100, 4 * KIB))
        position = rng.randrange(len(data))
        if kind == 1:  # patched in place: a version string, a constant
            patch = rng.randbytes(min(64, len(data) - position))
            return data[:position] + patch + data[position + len(patch) :]
        return data[:position] + rng.randbytes(rng.randint(1, 512)) + data[position:]  # inserted

    return read


# --- chunk layout of a converted layer ---------------------------------------------------------


@dataclass(frozen=True)
class FileLayout:
    name: str
    size: int
    verity: str
    chunks: tuple[ChunkRef, ...]

    @property
    def compressed(self) -> int:
        return sum(frame_bytes(c) for c in self.chunks)


def frame_bytes(chunk: ChunkRef) -> int:
    return 0 if chunk.zeros else chunk.blob_end - chunk.blob_offset


def layout_of(layer: ChunkedLayer) -> dict[str, FileLayout]:
    files: dict[str, FileLayout] = {}
    for group in group_file_entries(layer.toc.entries):
        head = group[0]
        if head.type == "reg":
            chunks = tuple(file_chunks(group))
            files[head.name] = FileLayout(head.name, head.size, head.verity, chunks)
    return files


@dataclass(frozen=True)
class Fetch:
    """What serving some reads costs: compressed bytes over the wire, uncompressed chunk bytes
    those carry (whole chunks), and range requests."""

    compressed: int
    chunk_bytes: int
    requests: int


def fetched_bytes(reads: Sequence[tuple[FileLayout, int, int]], config: ResolverConfig) -> Fetch:
    """The cost of serving ``reads`` (file, offset, length) in order from an empty cache,
    merging the chunks of one read into ranges as the resolver does."""
    cached: set[str] = set()
    compressed = chunk_bytes = requests = 0
    for file, offset, length in reads:
        end = min(offset + length, file.size)
        wanted = [
            c
            for c in file.chunks
            if c.file_offset < end
            and c.file_offset + c.size > offset
            and not c.zeros
            and c.verity not in cached
        ]
        cached.update(c.verity for c in wanted)
        chunk_bytes += sum(c.size for c in wanted)
        ranges: list[tuple[int, int]] = []
        for chunk in sorted(wanted, key=lambda c: c.blob_offset):
            if ranges:
                start, last_end = ranges[-1]
                if (
                    chunk.blob_offset - last_end <= config.merge_gap_bytes
                    and chunk.blob_end - start <= config.max_request_bytes
                ):
                    ranges[-1] = (start, max(last_end, chunk.blob_end))
                    continue
            ranges.append((chunk.blob_offset, chunk.blob_end))
        compressed += sum(e - s for s, e in ranges)
        requests += -(-len(ranges) // max(1, config.max_ranges_per_request))
    return Fetch(compressed, chunk_bytes, requests)


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Row:
    avg_kib: int
    chunks: int
    files: int
    blob_mb: float
    zstd_whole_mb: float
    toc_kb: float
    shared_pct: float
    file_shared_pct: float
    update_fetch_mb: float
    file_level_fetch_mb: float
    whole_layer_mb: float
    small_fetch_ratio: float
    random_fetch_ratio: float
    random_overfetch: float
    sequential_fetch_ratio: float
    sequential_overfetch: float
    convert_mb_s: float


def measure(report: Report, work: Path, size_bytes: int, averages: Sequence[int]) -> list[Row]:
    step(f"sampling {size_bytes / MB:.0f} MB of /usr")
    files = sample_files(usr_files(), target_bytes=size_bytes)
    report.fact("input", composition(files).describe())
    step("writing v1 and v2 tars")
    v1_tar, v2_tar = work / "v1.tar", work / "v2.tar"
    tar_bytes = write_tar_file(with_parent_dirs(file_entries(files)), v1_tar)
    v2_entries, edited = edited_entries(files)
    write_tar_file(with_parent_dirs(v2_entries), v2_tar)
    report.fact("tar bytes", tar_bytes)
    report.fact("v2 edits", f"{edited} of {len(files)} files edited (append/patch/insert)")
    zstd_whole = _zstd_size(v1_tar)
    report.fact("zstd -3 of the whole v1 tar (bytes)", zstd_whole)
    big = _big_file(files)
    report.fact("big file for partial reads", f"{big.name} ({big.size} bytes)")

    rows: list[Row] = []
    for avg in averages:
        config = ChunkingConfig(avg // 4, avg, avg * 4) if avg else ChunkingConfig(*[_HUGE] * 3)
        step(f"{_label(avg)}: converting v1 and v2")
        started = time.perf_counter()
        v1 = write_chunked_layer(v1_tar, work / "v1.zst", config)
        seconds = time.perf_counter() - started
        v2 = write_chunked_layer(v2_tar, work / "v2.zst", config)
        speed = mb_per_s(tar_bytes, seconds)
        rows.append(_row(report, avg, (v1, v2), big.name, zstd_whole, speed))
    return rows


def _big_file(files: Sequence[SourceFile]) -> SourceFile:
    """The biggest ELF file of the sample (a library or program a workload would page in
    partly), or the biggest file if there is no ELF file."""
    elf = [f for f in files if _is_elf(f.path)]
    return max(elf or files, key=lambda f: (f.size, f.name))


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def _row(
    report: Report,
    avg: int,
    versions: tuple[ChunkedLayer, ChunkedLayer],
    big_name: str,
    zstd_whole: int,
    speed: float,
) -> Row:
    label = _label(avg)
    v1, v2 = versions
    resolver = ResolverConfig()
    old, new = layout_of(v1), layout_of(v2)
    toc = parse_toc_position(v1.annotations[TOC_POSITION_ANNOTATION])

    v1_keys = {c.verity for f in old.values() for c in f.chunks}
    v1_files = {f.verity for f in old.values()}
    new_chunks: dict[str, ChunkRef] = {}
    shared = payload = 0
    for f in new.values():
        for c in f.chunks:
            payload += c.size
            if c.verity in v1_keys:
                shared += c.size
            elif not c.zeros:
                new_chunks.setdefault(c.verity, c)
    update_fetch = sum(frame_bytes(c) for c in new_chunks.values())
    file_level = sum(f.compressed for f in new.values() if f.verity not in v1_files)
    file_shared = sum(f.size for f in new.values() if f.verity in v1_files)

    rng = random.Random(_SEED)
    small = [f for f in sorted(old.values(), key=lambda f: f.name) if 0 < f.size <= SMALL_FILE_MAX]
    sample = rng.sample(small, min(SMALL_FILE_SAMPLE, len(small)))
    small_reads = [(f, 0, f.size) for f in sample]
    big = old[big_name]
    blocks = big.size // RANDOM_READ_BYTES
    offsets = [rng.randrange(blocks) * RANDOM_READ_BYTES for _ in range(RANDOM_READS)]
    random_reads = [(big, o, RANDOM_READ_BYTES) for o in offsets]
    middle = (big.size // 2) // RANDOM_READ_BYTES * RANDOM_READ_BYTES
    sequential = [(big, middle, SEQUENTIAL_READ_BYTES)]

    small_fetch = fetched_bytes(small_reads, resolver)
    random_fetch = fetched_bytes(random_reads, resolver)
    seq_fetch = fetched_bytes(sequential, resolver)
    small_read = sum(n for _, _, n in small_reads)
    random_read = RANDOM_READS * RANDOM_READ_BYTES
    seq_read = min(SEQUENTIAL_READ_BYTES, big.size - middle)

    say(f"{label}: {v1.stats.chunk_count} chunks for {v1.stats.file_count} files")
    whole = zstd_whole / MB
    report.add(f"{label} blob size", v1.size / MB, "MB", "zstd -3 of the whole tar", whole)
    report.add(f"{label} TOC (compressed)", toc.length / 1000, "kB", "blob size", v1.size / 1000)
    report.add(
        f"{label} v2 bytes shared with v1 (chunk digests)",
        100 * shared / payload,
        "%",
        "whole files shared (file digests)",
        100 * file_shared / payload,
    )
    report.add(
        f"{label} v2 update fetch, chunk dedup",
        update_fetch / MB,
        "MB",
        "file-level dedup fetch",
        file_level / MB,
        note=f"whole v2 layer {v2.size / MB:.1f} MB",
    )
    report.add(
        f"{label} {len(sample)} small files (<= 64 KiB) read whole: fetched",
        small_fetch.compressed / 1000,
        "kB",
        "bytes read",
        small_read / 1000,
        note=f"{small_fetch.requests} requests",
    )
    report.add(
        f"{label} {RANDOM_READS} random 4 KiB reads of a {big.size / MB:.1f} MB ELF file: fetched",
        random_fetch.compressed / 1000,
        "kB",
        "bytes read",
        random_read / 1000,
        note=f"{random_fetch.requests} requests, {random_fetch.chunk_bytes / 1000:.0f} kB "
        "of whole chunks",
    )
    report.add(
        f"{label} 1 MiB sequential read of that file: fetched",
        seq_fetch.compressed / 1000,
        "kB",
        "bytes read",
        seq_read / 1000,
        note=f"{seq_fetch.chunk_bytes / 1000:.0f} kB of whole chunks",
    )
    return Row(
        avg_kib=avg // KIB,
        chunks=v1.stats.chunk_count,
        files=v1.stats.file_count,
        blob_mb=round(v1.size / MB, 2),
        zstd_whole_mb=round(zstd_whole / MB, 2),
        toc_kb=round(toc.length / 1000, 1),
        shared_pct=round(100 * shared / payload, 2),
        file_shared_pct=round(100 * file_shared / payload, 2),
        update_fetch_mb=round(update_fetch / MB, 2),
        file_level_fetch_mb=round(file_level / MB, 2),
        whole_layer_mb=round(v2.size / MB, 2),
        small_fetch_ratio=round(small_fetch.compressed / small_read, 3),
        random_fetch_ratio=round(random_fetch.compressed / random_read, 2),
        random_overfetch=round(random_fetch.chunk_bytes / random_read, 2),
        sequential_fetch_ratio=round(seq_fetch.compressed / seq_read, 3),
        sequential_overfetch=round(seq_fetch.chunk_bytes / seq_read, 3),
        convert_mb_s=round(speed, 1),
    )


def _label(avg: int) -> str:
    return f"avg {avg // KIB}K" if avg else "whole files"


def _zstd_size(path: Path) -> int:
    size = 0
    with path.open("rb") as source:
        reader = zstandard.ZstdCompressor(level=3).read_to_iter(source, read_size=MIB)
        for piece in reader:
            size += len(piece)
    return size


def print_summary(rows: Sequence[Row]) -> None:
    print("\n## chunking summary\n")
    print(
        "Blob: zstd:chunked layer vs zstd -3 of the whole tar. Update: compressed MB a client "
        "holding v1 fetches for v2 (file-level dedup; whole v2 layer). Reads: compressed bytes "
        "fetched / bytes read, and [whole-chunk bytes / bytes read].\n"
    )
    print(
        "| chunking | chunks | blob MB | TOC kB | v2 bytes shared (file-level) | update MB | "
        "200 small files | 32 random 4 KiB | 1 MiB sequential | convert MB/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        loss = 100 * (r.blob_mb / r.zstd_whole_mb - 1)
        print(
            f"| {_row_label(r.avg_kib)} | {r.chunks} | {r.blob_mb:.1f} (+{loss:.1f}%) | "
            f"{r.toc_kb:.0f} | {r.shared_pct:.1f}% ({r.file_shared_pct:.1f}%) | "
            f"{r.update_fetch_mb:.2f} ({r.file_level_fetch_mb:.2f}; {r.whole_layer_mb:.1f}) | "
            f"{r.small_fetch_ratio:.2f} | {r.random_fetch_ratio:.1f} [{r.random_overfetch:.1f}] | "
            f"{r.sequential_fetch_ratio:.2f} [{r.sequential_overfetch:.2f}] | "
            f"{r.convert_mb_s:.0f} |"
        )
    print(flush=True)


def _row_label(avg_kib: int) -> str:
    if not avg_kib:
        return "one frame per file"
    return f"{avg_kib}K ({avg_kib // 4}K/{avg_kib * 4}K)"
