"""Warm reads: a mount whose chunks are all in the lazyfs cache, against the same files native.

The image has two gzip layers from this machine's /usr (deterministic samples): a tree of about
4,000 small files (up to 64 KiB each) and one 100 MiB file of concatenated /usr files. It is
converted by ``lazyfs convert``, pushed to a ``LocalRegistry`` (docker-registry on 127.0.0.1)
and read once in full through a ``lazyfs serve`` (that fills the cache). Every figure then
comes from a **fresh** ``lazyfs serve`` on that warm cache, mounted with ``lazyfs mount
--socket``; the native baseline is the same tars unpacked with ``tar -x`` on the same disk.
"Dropped" means ``sync; echo 3 > /proc/sys/vm/drop_caches`` just before.

a. sequential read of the 100 MiB file: the first one of the fresh service, then the median of
   ``--runs`` more, each dropped; native: the median of as many, dropped;
b. 4 KiB random ``pread`` (``--random-reads`` of them, 4 KiB-aligned, one fd), dropped:
   median and p99 in µs, against the native file;
c. the same with the chunk files in the page cache but not the mount's pages
   (``POSIX_FADV_DONTNEED`` on the mounted file): what RWF_NOWAIT serves from the event loop;
   against the native file page-cache-hot;
d. reading every file of the small tree in path order, dropped: seconds, against the tree;
e. with ``lazyfs serve --verify-cache-reads``: a. and b. again, against e. without.

``--py-spy DIR`` records the service with py-spy (``--nonblocking``, raw collapsed stacks)
during a. and b. and prints a summary of each recording (pyspy.py).

Run (root, /dev/fuse): ``python -m lazyfs.bench.micro warmread [--work-dir D] [--json F]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench.micro import pyspy
from lazyfs.bench.micro.common import (
    KIB,
    MIB,
    Report,
    drop_caches,
    interrupts_as_exceptions,
    lazyfs_argv,
    mb_per_s,
    median,
    percentile,
    print_machine,
    read_file_seconds,
    run,
    say,
    step,
    work_dir,
)
from lazyfs.bench.micro.inputs import file_entries, sample_files, usr_files
from lazyfs.bench.processes import stop_process
from lazyfs.config import STATS_XATTR
from lazyfs.convert.imagebuild import (
    regular_file,
    with_parent_dirs,
    write_tar_file,
    write_tar_image,
)
from lazyfs.errors import LazyfsError
from lazyfs.model.manifests import OCI_MANIFEST, Manifest
from lazyfs.mount.mountinfo import is_mounted
from lazyfs.registry.localserver import LocalRegistry
from lazyfs.service import client

REPOSITORY = "bench/warmread"
TREE_FILES = 4_000
TREE_FILE_MAX = 64 * KIB
BIG_FILE_BYTES = 100 * MIB
BIG_FILE_NAME = "big/big.bin"
READ_BYTES = 4 * KIB
_SEED = 11
_UP_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lazyfs.bench.micro warmread",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, help="keep the image, registry and cache here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--runs", type=int, default=5, help="dropped sequential reads (5)")
    parser.add_argument("--random-reads", type=int, default=2000, help="4 KiB preads (2000)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record the service here")
    parser.add_argument("--no-verify", action="store_true", help="skip e. (--verify-cache-reads)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    busy = print_machine()
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        say("bench warmread: needs /dev/fuse and fusermount3; skipped")
        return 0
    report = Report("warmread: warm reads through lazyfs serve vs native files")
    report.facts["CPU % used by other work at the start"] = round(busy, 1)
    with interrupts_as_exceptions(), work_dir(args.work_dir, "lazyfs-bench-warm-") as work:
        measure(report, work, args)
    report.print_table()
    report.write_json(args.json)
    return 0


# --- the image ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    oci_reference: str
    tars: tuple[Path, Path]
    tree_names: tuple[str, ...]
    big_sha256: str


def build_image(work: Path) -> Image:
    everything = usr_files()
    small = [f for f in everything if 0 < f.size <= TREE_FILE_MAX]
    tree = sample_files(small, target_count=TREE_FILES, salt="warmread-tree")
    parts = sample_files(
        [f for f in everything if f.size > TREE_FILE_MAX],
        target_bytes=BIG_FILE_BYTES,
        salt="warmread-big",
    )
    data = b"".join(f.path.read_bytes() for f in parts)[:BIG_FILE_BYTES]
    data += bytes(BIG_FILE_BYTES - len(data))
    tree_tar, big_tar = work / "tree.tar", work / "big.tar"
    write_tar_file(with_parent_dirs(file_entries(tree)), tree_tar)
    write_tar_file(with_parent_dirs([regular_file(BIG_FILE_NAME, data)]), big_tar)
    built = write_tar_image(work / "oci", "v1", [tree_tar, big_tar])
    return Image(
        built.reference,
        (tree_tar, big_tar),
        tuple(f.name for f in tree),
        hashlib.sha256(data).hexdigest(),
    )


# --- the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    pid: int
    socket: Path


@contextlib.contextmanager
def service(cache_dir: Path, run_dir: Path, *extra: str) -> Iterator[Service]:
    """A ``lazyfs serve`` of its own, up and answering; SIGTERM and wait afterwards."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    socket = run_dir / "control.sock"
    argv = lazyfs_argv(
        "--log-level", "info", "serve", "--cache-dir", cache_dir, "--run-dir", run_dir, *extra
    )
    with (run_dir.parent / f"{run_dir.name}.log").open("wb") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + _UP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"lazyfs serve exited ({process.returncode}); see {log.name}")
            try:
                client.call(socket, "stats", timeout_s=5)
                break
            except LazyfsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        yield Service(process.pid, socket)
    finally:
        stop_process(process, _STOP_TIMEOUT_S)


@contextlib.contextmanager
def mounted(svc: Service, reference: str, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    argv = lazyfs_argv(
        "mount", "--socket", svc.socket, "--tls-verify=false", "--no-prefetch",
        "--read-timeout", "60", reference, mountpoint,
    )  # fmt: skip
    try:
        run(argv, timeout=120)
        yield mountpoint
    finally:
        if is_mounted(mountpoint):
            result = run(lazyfs_argv("umount", "--socket", svc.socket, mountpoint), check=False)
            if result.returncode != 0 and is_mounted(mountpoint):
                run(["fusermount3", "-u", "-z", mountpoint], check=False)


def stats(mountpoint: Path) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(os.getxattr(mountpoint, STATS_XATTR))
    return parsed


# --- reads -------------------------------------------------------------------------------------


def dropped_seq_mb_s(path: Path) -> float:
    drop_caches()
    return mb_per_s(*read_file_seconds(path))


def random_offsets(size: int, count: int) -> list[int]:
    rng = random.Random(_SEED)
    return [rng.randrange(size // READ_BYTES) * READ_BYTES for _ in range(count)]


def pread_latencies_us(path: Path, offsets: Sequence[int], *, drop: bool) -> list[float]:
    if drop:
        drop_caches()
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            started = time.perf_counter_ns()
            os.pread(fd, READ_BYTES, offset)
            latencies.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.close(fd)
    return latencies


def forget_pages(path: Path) -> None:
    """Drop ``path``'s own page cache pages (the mount's; the chunk files keep theirs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_tree_seconds(root: Path, names: Sequence[str]) -> float:
    drop_caches()
    started = time.perf_counter()
    for name in names:
        with open(root / name, "rb", buffering=0) as handle:
            while handle.read(MIB):
                pass
    return time.perf_counter() - started


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class _Run:
    report: Report
    work: Path
    ref: str
    image: Image
    args: argparse.Namespace

    @property
    def native_big(self) -> Path:
        return self.work / "native" / BIG_FILE_NAME


def measure(report: Report, work: Path, args: argparse.Namespace) -> None:
    step("building the image from /usr (small tree + one 100 MiB file)")
    image = build_image(work)
    native, cache = work / "native", work / "cache"
    for stale in (native, cache):
        shutil.rmtree(stale, ignore_errors=True)
    native.mkdir()
    for tar in image.tars:
        run(["tar", "-xf", tar, "-C", native])
    with LocalRegistry(work / "registry") as registry:
        ref = f"{registry.host}/{REPOSITORY}:chunked"
        step(f"converting and pushing to {ref}")
        run(lazyfs_argv("convert", "-q", image.oci_reference, ref), timeout=170)
        manifest = _manifest(registry, ref)
        report.fact("layer sizes (zstd:chunked)", [layer.size for layer in manifest.layers])
        step("filling the cache: every file read once through a service")
        with service(cache, work / "run-fill") as svc, mounted(svc, ref, work / "mnt") as mnt:
            for name in image.tree_names:
                (mnt / name).read_bytes()
            big = (mnt / BIG_FILE_NAME).read_bytes()
            if hashlib.sha256(big).hexdigest() != image.big_sha256:
                raise RuntimeError(f"{BIG_FILE_NAME}: the mount returned different bytes")
            del big
            filled = stats(mnt)
        report.fact("chunks fetched to fill the cache", filled["chunks_fetched"])
        context = _Run(report, work, ref, image, args)
        _measure_warm(context, verify=False)
        if not args.no_verify:
            _measure_warm(context, verify=True)


def _manifest(registry: LocalRegistry, ref: str) -> Manifest:
    tag = ref.rpartition(":")[2]
    request = urllib.request.Request(
        f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return Manifest.parse(response.read(), response.headers.get("Content-Type"))


_BASELINES: dict[str, float] = {}  # figures without verification, for e.


def _measure_warm(ctx: _Run, *, verify: bool) -> None:
    label = "e. verified: " if verify else ""
    extra = ("--verify-cache-reads",) if verify else ()
    run_dir = ctx.work / ("run-verify" if verify else "run-warm")
    step(f"{label}fresh service on the warm cache")
    with (
        service(ctx.work / "cache", run_dir, *extra) as svc,
        mounted(svc, ctx.ref, ctx.work / "mnt") as mnt,
    ):
        big = mnt / BIG_FILE_NAME
        spy = _spy(ctx, svc, "verify" if verify else "plain")
        with spy("sequential"):
            first = dropped_seq_mb_s(big)
            lazy = [dropped_seq_mb_s(big) for _ in range(ctx.args.runs)]
        offsets = random_offsets(big.stat().st_size, ctx.args.random_reads)
        with spy("random"):
            lazy_lat = pread_latencies_us(big, offsets, drop=True)
        forget_pages(big)
        hot_lat = pread_latencies_us(big, offsets, drop=False)
        lazy_tree = read_tree_seconds(mnt, ctx.image.tree_names)
        final = stats(mnt)
    if verify:
        _report_verified(ctx.report, first, lazy, lazy_lat)
        ctx.report.fact("verification failures", final["verification_failures"])
        return
    native = [dropped_seq_mb_s(ctx.native_big) for _ in range(ctx.args.runs)]
    native_lat = pread_latencies_us(ctx.native_big, offsets, drop=True)
    pread_latencies_us(ctx.native_big, offsets, drop=False)  # now hot
    native_hot = pread_latencies_us(ctx.native_big, offsets, drop=False)
    native_tree = read_tree_seconds(ctx.work / "native", ctx.image.tree_names)
    report = ctx.report
    spread = f"lazyfs {min(lazy):.0f}-{max(lazy):.0f}, native {min(native):.0f}-{max(native):.0f}"
    report.add(
        "a. first sequential read of a fresh service, dropped",
        first, "MB/s", "native, dropped (median)", median(native),
    )  # fmt: skip
    report.add(
        f"a. sequential read, dropped (median of {len(lazy)})",
        median(lazy), "MB/s", "native, dropped (median)", median(native), note=spread,
    )  # fmt: skip
    _latencies(report, "b. 4 KiB random pread, dropped", lazy_lat, "native, dropped", native_lat)
    _latencies(
        report, "c. 4 KiB pread, chunk files cached, mount's pages not", hot_lat,
        "native, page cache hot", native_hot,
    )  # fmt: skip
    report.add(
        f"d. read all {len(ctx.image.tree_names)} small files, dropped",
        lazy_tree, "s", "native tree, dropped", native_tree,
    )  # fmt: skip
    report.fact("service counters after the run", _counters(final))
    _BASELINES.update(
        first=first, seq=median(lazy), p50=median(lazy_lat), p99=percentile(lazy_lat, 0.99)
    )


def _report_verified(report: Report, first: float, lazy: list[float], lat: list[float]) -> None:
    base = _BASELINES
    report.add("e. first sequential read, verified", first, "MB/s", "without (a)", base["first"])
    report.add(
        "e. sequential read, verified (median)", median(lazy), "MB/s", "without (a)", base["seq"]
    )
    report.add("e. 4 KiB random pread, verified, median", median(lat), "µs", "without", base["p50"])
    report.add(
        "e. 4 KiB random pread, verified, p99", percentile(lat, 0.99), "µs", "without", base["p99"]
    )


def _latencies(
    report: Report, label: str, values: list[float], baseline_name: str, baseline: list[float]
) -> None:
    report.add(f"{label}, median", median(values), "µs", baseline_name, median(baseline))
    report.add(
        f"{label}, p99", percentile(values, 0.99), "µs", baseline_name, percentile(baseline, 0.99)
    )


def _counters(figures: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "cache_hits", "cache_misses", "memory_hits", "nowait_reads", "thread_reads",
        "chunks_fetched", "internal_errors",
    )  # fmt: skip
    return {k: figures[k] for k in keys if k in figures}


def _spy(ctx: _Run, svc: Service, tag: str) -> Any:
    @contextlib.contextmanager
    def recording(phase: str) -> Iterator[None]:
        if ctx.args.py_spy is None:
            yield
            return
        ctx.args.py_spy.mkdir(parents=True, exist_ok=True)
        out = ctx.args.py_spy / f"{tag}-{phase}.txt"
        with pyspy.recording(svc.pid, out):
            yield
        for line in pyspy.summary(out):
            say(f"  py-spy {tag}-{phase}: {line}")

    return recording


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
