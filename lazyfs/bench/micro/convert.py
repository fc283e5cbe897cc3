"""Conversion throughput: ``lazyfs convert`` on one realistic gzip layer of about 280 MB.

The layer is a deterministic sample (by path hash) of this machine's /usr (ELF binaries and
libraries, scripts, text, compressed and other binary files), written as a reproducible PAX tar
and gzip -6, in an OCI layout; or any layer tar given with ``--tar`` (a root filesystem, e.g.
``mmdebstrap --variant=apt --include=python3,gcc,libc6-dev bookworm rootfs.tar``). Throughput
is always MB/s (10^6 bytes) of *uncompressed tar*.

Measured, each on all cores and pinned to one core (``taskset -c 0`` / sched_setaffinity):

- ``lazyfs convert oci:IN oci:OUT`` end to end (the CLI in a child process);
- its two phases: decompress the gzip input (``lazyfs.formats.plain.decompress_layer``, in
  process: inflate, sha256 of blob and tar, write the tar) and chunk+hash+compress
  (``lazyfs.formats.chunked.writer.write_chunked_layer``: fastcdc, zstd frames, sha256,
  fs-verity, crc64, TOC and tar-split), the latter in a child process per run so that its CPU
  time and peak RSS (the writer's, and its largest worker process's) are its own; the blobs of
  both runs must be byte-identical;
- baselines on the same tar in the same run: ``zstd -3 -T1`` pinned to one core and
  ``zstd -3 -T0`` on all cores (CLI), python-zstandard level 3, and gzip decompression of the
  input (zlib, as lazyfs uses it, and ``gzip -dc``).

With ``--baseline-tree DIR`` (a copy of the ``lazyfs`` package as it was before a change,
under DIR), the chunk+hash+compress phase and the end-to-end convert also run with that tree,
run for run alternating with this one (same machine state), and the table gains
after-vs-before figures. Each lazyfs figure is the fastest of ``--repeats`` runs; the median
is in its note (other work on the machine only ever makes a run slower).

Run: ``python -m lazyfs.bench.micro convert [--size-mb 256 | --tar FILE] [--baseline-tree DIR]
[--repeats N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    mb_per_s,
    median,
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
from lazyfs.formats.chunked.writer import LayerWriter, write_chunked_layer
from lazyfs.formats.plain import decompress_layer
from lazyfs.model.digest import Digest

# label -> CPUs to pin to (None: every core, the default affinity)
ALL_CORES = f"{len(os.sched_getaffinity(0))} cores"
ONE_CORE = "1 core"
CORES: dict[str, set[int] | None] = {ALL_CORES: None, ONE_CORE: {0}}
_ZSTD_CLI_NAMES = {ALL_CORES: "zstd -3 -T0 CLI", ONE_CORE: "zstd -3 -T1 CLI (taskset -c 0)"}
_READ_BYTES = 1 << 20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lazyfs.bench.micro convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size-mb", type=int, default=256, help="MiB of file data (default 256)")
    parser.add_argument("--tar", type=Path, help="convert this layer tar instead of a /usr sample")
    parser.add_argument("--repeats", type=int, default=2, help="runs per lazyfs figure (best)")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run the writer and convert from the lazyfs package under this directory",
    )
    parser.add_argument("--work-dir", type=Path, help="keep inputs and outputs here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    busy = print_machine()
    report = Report("convert: throughput in MB/s of uncompressed tar")
    report.facts["CPU % used by other work at the start"] = round(busy, 1)
    with interrupts_as_exceptions(), work_dir(args.work_dir, "lazyfs-bench-convert-") as work:
        measure(
            report, work, args.size_mb * MIB, max(1, args.repeats), args.tar, args.baseline_tree
        )
    report.print_table()
    report.write_json(args.json)
    return 0


def measure(
    report: Report,
    work: Path,
    size_bytes: int,
    repeats: int,
    given_tar: Path | None = None,
    baseline_tree: Path | None = None,
) -> None:
    if given_tar is None:
        step(f"sampling {size_bytes / MB:.0f} MB of /usr")
        files = sample_files(usr_files(), target_bytes=size_bytes)
        report.fact("input", composition(files).describe())
        tar_path = work / "input.tar"
        step("writing the layer tar and gzip -6 OCI image")
        tar_bytes = write_tar_file(with_parent_dirs(file_entries(files)), tar_path)
    else:
        tar_path, tar_bytes = given_tar, given_tar.stat().st_size
        report.fact("input", str(given_tar))
        step("writing the gzip -6 OCI image")
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

    step("lazyfs phases")
    phase_tar = work / "phase.tar"
    decompress_s: dict[str, float] = {}
    for label, cpus in CORES.items():
        with cpu_affinity(cpus):
            decompress_s[label] = best_seconds(
                lambda: decompress_layer(blob_path, "gzip", layer.digest, phase_tar), repeats
            )
    trees: list[Path | None] = [None] if baseline_tree is None else [None, baseline_tree]
    runs = {
        label: _writer_runs(phase_tar, work, cpus, repeats, trees) for label, cpus in CORES.items()
    }
    chunk = {label: _fastest(runs[label][None]) for label in CORES}
    phase_tar.unlink()

    step("lazyfs convert end to end (CLI)")
    e2e_runs = {
        label: _convert_cli_seconds(built.reference, work, cpus, repeats, trees)
        for label, cpus in CORES.items()
    }
    e2e = {label: min(e2e_runs[label][None]) for label in CORES}

    say("figures (MB/s of uncompressed tar; ratio = lazyfs / baseline):")
    for label in CORES:
        report.add(
            f"lazyfs convert end to end, {label}",
            mb_per_s(tar_bytes, e2e[label]),
            "MB/s",
            _ZSTD_CLI_NAMES[label],
            mb_per_s(tar_bytes, zstd_cli[label]),
            note=_spread(tar_bytes, e2e_runs[label][None]),
        )
    for label in CORES:
        run_ = chunk[label]
        report.add(
            f"phase chunk+hash+compress, {label}",
            mb_per_s(tar_bytes, run_.wall_s),
            "MB/s",
            _ZSTD_CLI_NAMES[label],
            mb_per_s(tar_bytes, zstd_cli[label]),
            note=f"{run_.processes} process(es), {run_.cpu_s:.2f} s CPU; "
            + _spread(tar_bytes, [r.wall_s for r in runs[label][None]]),
        )
    if baseline_tree is not None:
        _add_before_after(report, tar_bytes, runs, e2e_runs, baseline_tree)
    all_cores, one_core = chunk[ALL_CORES], chunk[ONE_CORE]
    report.add(
        f"phase chunk+hash+compress, {ALL_CORES} (speedup)",
        mb_per_s(tar_bytes, all_cores.wall_s),
        "MB/s",
        "the same, 1 core",
        mb_per_s(tar_bytes, one_core.wall_s),
    )
    report.add(
        f"phase chunk+hash+compress, {ALL_CORES}",
        mb_per_s(tar_bytes, all_cores.wall_s),
        "MB/s",
        "python-zstandard level 3, one stream",
        mb_per_s(tar_bytes, zstd_py_s),
    )
    for label in CORES:
        run_ = chunk[label]
        report.add(
            f"peak RSS of chunk+hash+compress, {label}",
            run_.total_rss_mib,
            "MiB",
            "the 256 MiB limit",
            256,
            note=f"{run_.processes} process(es) added up; the writer alone {run_.rss_mib:.0f} MiB",
        )
    report.fact("blob identical on 1 core and on all cores", one_core.digest == all_cores.digest)
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
        one_core.blob_bytes / MB,
        "MB",
        "zstd -3 of the whole tar",
        zstd_size / MB,
        note=f"gzip -6 input: {layer.size / MB:.1f} MB",
    )


@dataclass(frozen=True)
class WriterRun:
    """One ``write_chunked_layer`` in a child process, as ``writer_child`` reports it."""

    wall_s: float
    cpu_s: float  # the writer's and its workers'
    rss_mib: float  # the writer process's peak (VmHWM)
    total_rss_mib: float  # the peak of the writer's and its workers' RSS added up (sampled)
    processes: int
    digest: str
    blob_bytes: int


def _writer_runs(
    tar_path: Path, work: Path, cpus: set[int] | None, repeats: int, trees: list[Path | None]
) -> dict[Path | None, list[WriterRun]]:
    """For each tree (None: this one), ``repeats`` runs, each in a fresh child process on
    ``cpus``, the trees taking turns; every blob must be the same."""
    out = work / "phase.zst"
    runs: dict[Path | None, list[WriterRun]] = {tree: [] for tree in trees}
    for _ in range(repeats):
        for tree in trees:
            argv = [*_prefix(cpus, tree), "-c", _WRITER_CHILD, str(tar_path)]
            runs[tree].append(WriterRun(**json.loads(run([*argv, str(out)], timeout=600).stdout)))
    out.unlink()
    digests = {r.digest for tree_runs in runs.values() for r in tree_runs}
    if len(digests) != 1:
        raise SystemExit(f"the trees wrote different blobs: {sorted(digests)}")
    return runs


def _fastest(runs: list[WriterRun]) -> WriterRun:
    return min(runs, key=lambda r: r.wall_s)


def _prefix(cpus: set[int] | None, tree: Path | None) -> list[str]:
    """``taskset`` to ``cpus``, ``env PYTHONPATH=tree`` to import that lazyfs, and the Python
    to run, with ``-P``: without it, ``-c`` and ``-m`` put the working directory (perhaps a
    checkout with its own lazyfs) before PYTHONPATH."""
    prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    return [
        *prefix,
        *(["env", f"PYTHONPATH={tree}"] if tree is not None else []),
        sys.executable,
        "-P",
    ]


def _spread(tar_bytes: int, seconds: list[float]) -> str:
    rates = [mb_per_s(tar_bytes, s) for s in seconds]
    return (
        f"min {min(seconds):.2f} s / median {median(seconds):.2f} s of {len(seconds)}"
        f" ({min(rates):.0f}-{max(rates):.0f} MB/s)"
    )


def _add_before_after(
    report: Report,
    tar_bytes: int,
    runs: dict[str, dict[Path | None, list[WriterRun]]],
    e2e_runs: dict[str, dict[Path | None, list[float]]],
    tree: Path,
) -> None:
    """This tree against the baseline tree: best and median, phase and end to end."""
    for label in CORES:
        after, before = runs[label][None], runs[label][tree]
        report.add(
            f"phase chunk+hash+compress, {label}, this tree vs baseline tree",
            mb_per_s(tar_bytes, _fastest(after).wall_s),
            "MB/s",
            f"baseline tree {tree}",
            mb_per_s(tar_bytes, _fastest(before).wall_s),
            note=f"CPU {_fastest(after).cpu_s:.2f} s vs {_fastest(before).cpu_s:.2f} s; medians "
            f"{median([r.wall_s for r in after]):.2f} s vs "
            f"{median([r.wall_s for r in before]):.2f} s",
        )
        new, old = e2e_runs[label][None], e2e_runs[label][tree]
        report.add(
            f"lazyfs convert end to end, {label}, this tree vs baseline tree",
            mb_per_s(tar_bytes, min(new)),
            "MB/s",
            f"baseline tree {tree}",
            mb_per_s(tar_bytes, min(old)),
            note=f"medians {median(new):.2f} s vs {median(old):.2f} s",
        )
    for name, key in (("this tree", None), ("baseline tree", tree)):
        report.add(
            f"phase chunk+hash+compress, {ALL_CORES} vs 1 core (speedup), {name}",
            mb_per_s(tar_bytes, _fastest(runs[ALL_CORES][key]).wall_s),
            "MB/s",
            "the same, 1 core",
            mb_per_s(tar_bytes, _fastest(runs[ONE_CORE][key]).wall_s),
        )


_WRITER_CHILD = "import sys; from lazyfs.bench.micro.convert import writer_child; writer_child()"


def writer_child() -> None:
    """In a child process: convert ``argv[1]`` to ``argv[2]``, print a :class:`WriterRun`."""
    tar_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    config = ChunkingConfig()
    processes = LayerWriter(config, None).worker_count(tar_path.stat().st_size)
    diff_id = Digest("sha256", "0" * 64)  # as localize passes it: hashed while decompressing
    with _RssSampler() as rss:
        start = time.perf_counter()
        layer = write_chunked_layer(tar_path, out, config, diff_id)
        wall_s = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = WriterRun(
        wall_s=wall_s,
        cpu_s=own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime,
        rss_mib=_status_kib(Path("/proc/self/status"), "VmHWM") / 1024,
        total_rss_mib=rss.peak_kib / 1024,
        processes=processes,
        digest=str(layer.digest),
        blob_bytes=layer.size,
    )
    print(json.dumps(asdict(result)))


class _RssSampler:
    """The peak of this process's RSS plus its children's, sampled every 5 ms in a thread.

    Not ``getrusage``: Linux carries ``ru_maxrss`` across the fork+exec that starts a process,
    so a child started by a big parent reports the parent's size.
    """

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = Path("/proc/self")
        while not self._stop.wait(0.005):
            pids = [p for task in (me / "task").iterdir() for p in _children(task)]
            total = _status_kib(me / "status", "VmRSS")
            total += sum(_status_kib(Path(f"/proc/{pid}/status"), "VmRSS") for pid in pids)
            self.peak_kib = max(self.peak_kib, total)


def _children(task: Path) -> list[str]:
    try:
        return (task / "children").read_text().split()
    except OSError:
        return []


def _status_kib(status: Path, field: str) -> int:
    """A ``kB`` field of /proc/PID/status; 0 once the process is gone."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _zstd_cli_seconds(tar_path: Path, cpus: set[int] | None) -> float:
    """``zstd -3`` on ``cpus``: one thread pinned to them, or a thread per core (-T0)."""
    prefix = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    threads = "-T1" if cpus else "-T0"
    argv = [*prefix, "zstd", "-3", threads, "-q", "-c", str(tar_path)]
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


def _convert_cli_seconds(
    source: str, work: Path, cpus: set[int] | None, repeats: int, trees: list[Path | None]
) -> dict[Path | None, list[float]]:
    """Wall times of ``lazyfs convert`` per tree (None: this one), the trees taking turns."""
    times: dict[Path | None, list[float]] = {tree: [] for tree in trees}
    for attempt in range(repeats):
        for tree in trees:
            out = work / f"out-oci-{attempt}"
            argv = [*_prefix(cpus, tree), "-m", "lazyfs", "convert", "-q", source, f"oci:{out}:v1"]
            try:
                times[tree].append(timed(functools.partial(run, argv, timeout=170)))
            finally:
                shutil.rmtree(out, ignore_errors=True)
    return times
