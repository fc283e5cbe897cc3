"""Conversion throughput: ``lazyfs convert`` on one realistic gzip layer of about 280 MB.

The layer is a deterministic sample (by path hash) of this machine's /usr (ELF binaries and
libraries, scripts, text, compressed and other binary files), written as a reproducible PAX tar
and gzip -6, in an OCI layout. Throughput is always MB/s (10^6 bytes) of *uncompressed tar*.

Measured, each on both cores and pinned to one core (``taskset -c 0`` / sched_setaffinity):

- ``lazyfs convert oci:IN oci:OUT`` end to end (the CLI in a child process);
- its two phases in-process: decompress the gzip input (``lazyfs.formats.plain.decompress_layer``:
  inflate, sha256 of blob and tar, write the tar) and chunk+hash+compress
  (``lazyfs.formats.chunked.writer.write_chunked_layer``: fastcdc, zstd frames, sha256, fs-verity,
  crc64, TOC and tar-split);
- baselines on the same tar in the same run: ``zstd -3`` (CLI, one thread) and python-zstandard
  level 3, and gzip decompression of the input (zlib, as lazyfs uses it, and ``gzip -dc``).

Run: ``python -m lazyfs.bench.micro convert [--size-mb 256] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, cast

import zstandard

from lazyfs.bench.micro.common import (
    MB,
    MIB,
    Report,
    best_seconds,
    cpu_affinity,
    interrupts_as_exceptions,
    lazyfs_argv,
    mb_per_s,
    print_machine,
    run,
    say,
    step,
    timed,
    work_dir,
)
from lazyfs.bench.micro.inputs import composition, file_entries, sample_files, usr_files
from lazyfs.config import ChunkingConfig
from lazyfs.convert.imagebuild import with_parent_dirs, write_tar_file, write_tar_image
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.formats.plain import decompress_layer

# label -> CPUs to pin to (None: both cores, the default affinity)
CORES: dict[str, set[int] | None] = {"2 cores": None, "1 core": {0}}
_READ_BYTES = 1 << 20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lazyfs.bench.micro convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-mb", type=int, default=256, help="MiB of file data (default 256)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per lazyfs figure (best)")
    parser.add_argument("--work-dir", type=Path, help="keep inputs and outputs here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    busy = print_machine()
    report = Report("convert: throughput in MB/s of uncompressed tar")
    report.facts["CPU % used by other work at the start"] = round(busy, 1)
    with interrupts_as_exceptions(), work_dir(args.work_dir, "lazyfs-bench-convert-") as work:
        measure(report, work, args.size_mb * MIB, max(1, args.repeats))
    report.print_table()
    report.write_json(args.json)
    return 0


def measure(report: Report, work: Path, size_bytes: int, repeats: int) -> None:
    step(f"sampling {size_bytes / MB:.0f} MB of /usr")
    files = sample_files(usr_files(), target_bytes=size_bytes)
    report.fact("input", composition(files).describe())
    tar_path = work / "input.tar"
    step("writing the layer tar and gzip -6 OCI image")
    tar_bytes = write_tar_file(with_parent_dirs(file_entries(files)), tar_path)
    built = write_tar_image(work / "in-oci", "v1", [tar_path])
    layer = built.layers[0].descriptor
    blob_path = built.layout.blob_path(layer.digest)
    report.fact("tar bytes", tar_bytes)
    report.fact("gzip -6 blob bytes", layer.size)

    step("baselines: zstd -3, gzip decompression")
    zstd_cli = {label: _zstd_cli_seconds(tar_path, cpus) for label, cpus in CORES.items()}
    zstd_py_s, zstd_size = _zstd_python(tar_path)
    gunzip_s = best_seconds(lambda: _gunzip(blob_path), 3)
    gzip_cli_s = best_seconds(lambda: run(["gzip", "-dc", blob_path], stdout_null=True), 3)

    step("lazyfs phases in-process")
    phase_tar = work / "phase.tar"
    phase_out = work / "phase.zst"
    decompress_s: dict[str, float] = {}
    chunk_s: dict[str, float] = {}
    for label, cpus in CORES.items():
        with cpu_affinity(cpus):
            decompress_s[label] = best_seconds(
                lambda: decompress_layer(blob_path, "gzip", layer.digest, phase_tar), repeats
            )
            chunk_s[label] = best_seconds(
                lambda: write_chunked_layer(phase_tar, phase_out, ChunkingConfig()), repeats
            )
    chunked_size = phase_out.stat().st_size
    phase_tar.unlink()
    phase_out.unlink()

    step("lazyfs convert end to end (CLI)")
    e2e = {
        label: _convert_cli_seconds(built.reference, work, cpus, repeats)
        for label, cpus in CORES.items()
    }

    say("figures (MB/s of uncompressed tar; ratio = lazyfs / baseline):")
    for label in CORES:
        pinned = " (taskset -c 0)" if CORES[label] else ""
        report.add(
            f"lazyfs convert end to end, {label}",
            mb_per_s(tar_bytes, e2e[label]),
            "MB/s",
            f"zstd -3 -T1 CLI{pinned}",
            mb_per_s(tar_bytes, zstd_cli[label]),
        )
    for label in CORES:
        report.add(
            f"phase chunk+hash+compress, {label}",
            mb_per_s(tar_bytes, chunk_s[label]),
            "MB/s",
            "python-zstandard level 3, one stream",
            mb_per_s(tar_bytes, zstd_py_s),
        )
    for label in CORES:
        report.add(
            f"phase decompress input, {label}",
            mb_per_s(tar_bytes, decompress_s[label]),
            "MB/s",
            "zlib gunzip alone",
            mb_per_s(tar_bytes, gunzip_s),
            note="inflate + sha256 of blob and tar + write the tar",
        )
    report.add(
        "gzip -dc (CLI), for reference",
        mb_per_s(tar_bytes, gzip_cli_s),
        "MB/s",
        "zlib gunzip alone",
        mb_per_s(tar_bytes, gunzip_s),
    )
    report.add(
        "zstd:chunked blob size",
        chunked_size / MB,
        "MB",
        "zstd -3 of the whole tar",
        zstd_size / MB,
        note=f"gzip -6 input: {layer.size / MB:.1f} MB",
    )


def _zstd_cli_seconds(tar_path: Path, cpus: set[int] | None) -> float:
    prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    argv = [*prefix, "zstd", "-3", "-T1", "-q", "-c", str(tar_path)]
    return best_seconds(lambda: run(argv, stdout_null=True), 3)


def _zstd_python(tar_path: Path) -> tuple[float, int]:
    sink = _CountingSink()

    def compress() -> None:
        sink.size = 0
        with tar_path.open("rb") as source:
            zstandard.ZstdCompressor(level=3).copy_stream(
                source, cast(IO[bytes], sink), read_size=_READ_BYTES
            )

    return best_seconds(compress, 3), sink.size


class _CountingSink:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


def _gunzip(blob_path: Path) -> int:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    with blob_path.open("rb") as source:
        while data := source.read(_READ_BYTES):
            total += len(inflater.decompress(data))
    return total + len(inflater.flush())


def _convert_cli_seconds(source: str, work: Path, cpus: set[int] | None, repeats: int) -> float:
    best = float("inf")
    for attempt in range(repeats):
        out = work / f"out-oci-{attempt}"
        prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        argv = [*prefix, *lazyfs_argv("convert", "-q", source, f"oci:{out}:v1")]
        try:
            best = min(best, timed(functools.partial(run, argv, timeout=170)))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return best
