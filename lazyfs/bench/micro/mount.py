"""A real lazy mount against a loopback registry, against curl and against native files.

The image has two gzip layers built from this machine's /usr (deterministic samples): a tree of
about 24,000 small files (under 64 KiB each) with their directories, and one 100 MiB file made
of concatenated /usr files. It is converted and pushed by ``lazyfs convert`` to a
``LocalRegistry`` (Debian's docker-registry on 127.0.0.1), and mounted with the real CLI
(``lazyfs mount``, a daemon). The native baseline is the same two tars extracted with ``tar -x``
into a directory on the same disk as the lazyfs cache.

Figures (page cache dropped with ``echo 3 > /proc/sys/vm/drop_caches`` wherever it says cold or
warm; "warm" means the chunks are in the lazyfs cache on disk):

a. cold read of one small file: bytes the registry sent (its access log) and ``lazyfs stats``
   bytes_fetched, against the image's compressed size; time to mount and read it, against
   pulling and unpacking the whole image with curl, zstd and tar;
b. cold sequential read of the 100 MiB file, MB/s, against curl GET of its layer blob (alone
   and piped through ``zstd -d``) from the same registry, and a native read;
c. warm sequential read of that file, MB/s, against a native read (both with caches dropped);
d. warm 4 KiB random reads: median and p95 latency in µs, against the native file;
e. metadata: ``find`` and an ``os.walk`` + ``lstat`` over every entry, entries/s, cold and warm,
   against the native copy;
f. cost of ``--verify-cache-reads``: warm sequential and random reads with it on, against off.

Every mount is unmounted and the registry stopped even on failure or SIGTERM. Reads run with
``--read-timeout 60``, so a stuck fetch fails instead of hanging.

Run (root, /dev/fuse): ``python -m lazyfs.bench.micro mount [--json FILE]``.
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
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench.micro.common import (
    KIB,
    MB,
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
from lazyfs.bench.micro.inputs import SourceFile, file_entries, sample_files, usr_files
from lazyfs.convert.imagebuild import (
    BuiltImage,
    regular_file,
    with_parent_dirs,
    write_tar_file,
    write_tar_image,
)
from lazyfs.model.manifests import OCI_MANIFEST, Manifest
from lazyfs.mount.mountinfo import is_mounted
from lazyfs.registry.localserver import LocalRegistry

REPOSITORY = "bench/mount"
TREE_FILES = 24_000
TREE_FILE_MAX = 64 * KIB
BIG_FILE_BYTES = 100 * MIB
BIG_FILE_NAME = "big/big.bin"
RANDOM_READS = 1000
RANDOM_READ_BYTES = 4 * KIB
WARM_RUNS = 5
READ_TIMEOUT_S = 60
_SEED = 7


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lazyfs.bench.micro mount",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, help="keep the image, registry and cache here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    busy = print_machine()
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        say("bench mount: needs /dev/fuse and fusermount3; skipped")
        return 0
    report = Report("mount: lazy mount over a loopback registry")
    report.facts["CPU % used by other work at the start"] = round(busy, 1)
    with interrupts_as_exceptions(), work_dir(args.work_dir, "lazyfs-bench-mount-") as work:
        measure(report, work)
    report.print_table()
    report.write_json(args.json)
    return 0


# --- the image ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchImage:
    built: BuiltImage
    tree_tar: Path
    big_tar: Path
    small_file: SourceFile
    big_data_sha256: str


def build_image(work: Path) -> BenchImage:
    everything = usr_files()
    small = [f for f in everything if 0 < f.size <= TREE_FILE_MAX]
    tree = sample_files(small, target_count=TREE_FILES, salt="mount-tree")
    big_parts = sample_files(
        [f for f in everything if f.size > TREE_FILE_MAX],
        target_bytes=BIG_FILE_BYTES,
        salt="mount-big",
    )

    def big_data() -> bytes:
        data = b"".join(f.path.read_bytes() for f in big_parts)[:BIG_FILE_BYTES]
        if len(data) < BIG_FILE_BYTES:
            data += bytes(BIG_FILE_BYTES - len(data))
        return data

    tree_tar, big_tar = work / "tree.tar", work / "big.tar"
    write_tar_file(with_parent_dirs(file_entries(tree)), tree_tar)
    data = big_data()
    write_tar_file(with_parent_dirs([regular_file(BIG_FILE_NAME, data)]), big_tar)
    built = write_tar_image(work / "oci", "v1", [tree_tar, big_tar])
    chosen = next(f for f in tree if 4 * KIB <= f.size <= 16 * KIB)
    return BenchImage(built, tree_tar, big_tar, chosen, hashlib.sha256(data).hexdigest())


# --- mounts ------------------------------------------------------------------------------------


class Mounts:
    """Mounts made with the real CLI; all unmounted (daemon waited for) on close."""

    def __init__(self) -> None:
        self._live: dict[Path, int] = {}

    def mount(self, ref: str, mountpoint: Path, cache_dir: Path, *extra: str) -> float:
        """Mount and return the seconds ``lazyfs mount`` took (it returns once serving)."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        argv = lazyfs_argv(
            "mount", "--cache-dir", cache_dir, "--read-timeout", str(READ_TIMEOUT_S), *extra
        )
        started = time.perf_counter()
        run([*argv, ref, mountpoint], timeout=120)
        seconds = time.perf_counter() - started
        self._live[mountpoint] = int(stats(mountpoint)["pid"])
        return seconds

    def unmount(self, mountpoint: Path) -> None:
        pid = self._live.pop(mountpoint, None)
        if pid is None:
            return
        result = run(lazyfs_argv("umount", mountpoint), check=False, timeout=60)
        if result.returncode != 0 and is_mounted(mountpoint):
            say(f"  lazyfs umount failed ({result.stderr.strip()}); lazy unmount")
            run(["fusermount3", "-u", "-z", mountpoint], check=False)
        _wait_gone(pid)

    def close(self) -> None:
        for mountpoint in list(self._live):
            try:
                self.unmount(mountpoint)
            except Exception as exc:  # keep unmounting the others
                say(f"  cleanup of {mountpoint} failed: {exc}")


def stats(mountpoint: Path) -> dict[str, Any]:
    result = run(lazyfs_argv("stats", "--json", mountpoint), timeout=30)
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _wait_gone(pid: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    say(f"  daemon {pid} still running after unmount; sending SIGTERM")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)


@contextlib.contextmanager
def mounts() -> Iterator[Mounts]:
    manager = Mounts()
    try:
        yield manager
    finally:
        manager.close()


# --- registry byte counts ----------------------------------------------------------------------


def registry_get_bytes(registry: LocalRegistry) -> tuple[int, int]:
    """(body bytes, requests) of GETs so far, once the access log has stopped growing."""
    previous: tuple[int, int] | None = None
    deadline = time.monotonic() + 3
    while True:
        summary = registry.access_log_summary()
        current = (summary.written("GET"), summary.count("GET"))
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(0.3)


# --- measuring ---------------------------------------------------------------------------------


def measure(report: Report, work: Path) -> None:
    step("building the image from /usr (tree of small files + one 100 MiB file)")
    bench_image = build_image(work)
    native = work / "native"
    for stale in (native, work / "cache", work / "pulled"):  # a kept --work-dir must start cold
        shutil.rmtree(stale, ignore_errors=True)
    native.mkdir()
    for tar in (bench_image.tree_tar, bench_image.big_tar):
        run(["tar", "-xf", tar, "-C", native])
    with LocalRegistry(work / "registry") as registry, mounts() as mount_manager:
        ref = f"{registry.host}/{REPOSITORY}:chunked"
        step(f"converting and pushing to {ref}")
        run(lazyfs_argv("convert", "-q", bench_image.built.reference, ref), timeout=170)
        converted = _converted_manifest(registry, ref)
        image_bytes = sum(layer.size for layer in converted.layers)
        report.fact("image (zstd:chunked) compressed bytes", image_bytes)
        report.fact("layer sizes", [layer.size for layer in converted.layers])
        report.fact(
            "uncompressed tar bytes", sum(layer.tar_size for layer in bench_image.built.layers)
        )
        context = _Context(report, work, registry, ref, converted, native, bench_image)
        _run_all(context, mount_manager)


def _converted_manifest(registry: LocalRegistry, ref: str) -> Manifest:
    """The pushed manifest, straight from the registry (before any counted GET)."""
    tag = ref.rpartition(":")[2]
    request = urllib.request.Request(
        f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return Manifest.parse(response.read(), response.headers.get("Content-Type"))


@dataclass
class _Context:
    report: Report
    work: Path
    registry: LocalRegistry
    ref: str
    manifest: Manifest
    native: Path
    image: BenchImage

    @property
    def image_bytes(self) -> int:
        return sum(layer.size for layer in self.manifest.layers)

    def blob_url(self, index: int) -> str:
        digest = self.manifest.layers[index].digest
        return f"{self.registry.url}/v2/{REPOSITORY}/blobs/{digest}"


def _run_all(ctx: _Context, manager: Mounts) -> None:
    cache = ctx.work / "cache"
    mnt = ctx.work / "mnt"
    small_name = ctx.image.small_file.name
    big_native = ctx.native / BIG_FILE_NAME

    step("a. cold mount and read of one small file")
    before = registry_get_bytes(ctx.registry)
    drop_caches()
    mount_s = manager.mount(ctx.ref, mnt, cache)
    after_mount = registry_get_bytes(ctx.registry)
    read_started = time.perf_counter()
    data = (mnt / small_name).read_bytes()
    first_read_s = time.perf_counter() - read_started
    after_read = registry_get_bytes(ctx.registry)
    own = stats(mnt)
    if data != ctx.image.small_file.path.read_bytes():
        raise RuntimeError(f"{small_name}: the mount returned different bytes")
    _report_small(ctx, before, after_mount, after_read, own, len(data), mount_s, first_read_s)
    pull_s = _full_pull_seconds(ctx)
    ctx.report.add(
        "a. lazyfs mount + first read of one small file",
        mount_s + first_read_s,
        "s",
        "pull whole image with curl, zstd -d | tar -x",
        pull_s,
    )

    step("b. cold sequential read of the 100 MiB file")
    fetched_before = own["bytes_fetched"]
    drop_caches()
    size, cold_s = read_file_seconds(mnt / BIG_FILE_NAME)
    big_fetched = stats(mnt)["bytes_fetched"] - fetched_before
    cold = mb_per_s(size, cold_s)
    curl_s = _curl_seconds(ctx, 1, decompress=False)
    curl_zstd_s = _curl_seconds(ctx, 1, decompress=True)
    drop_caches()
    _, native_cold_s = read_file_seconds(big_native)
    layer_bytes = ctx.manifest.layers[1].size
    ctx.report.add(
        "b. cold sequential read via lazyfs",
        cold,
        "MB/s",
        "curl GET of its layer blob (file MB / s)",
        mb_per_s(size, curl_s),
        note=f"blob {layer_bytes / MB:.1f} MB at {mb_per_s(layer_bytes, curl_s):.0f} MB/s",
    )
    ctx.report.add(
        "b. cold sequential read via lazyfs",
        cold,
        "MB/s",
        "curl GET | zstd -d of that blob",
        mb_per_s(size, curl_zstd_s),
    )
    native_cold = mb_per_s(size, native_cold_s)
    label = "b. cold sequential read via lazyfs"
    ctx.report.add(label, cold, "MB/s", "native file, cold", native_cold)
    ctx.report.add(
        "b. bytes fetched for the 100 MiB file (lazyfs stats)",
        big_fetched / MB,
        "MB",
        "its layer blob",
        layer_bytes / MB,
    )

    step("c. warm sequential reads (caches dropped before each)")
    warm, warm_range = _median_throughput(mnt / BIG_FILE_NAME)
    native_warm, native_range = _median_throughput(big_native)
    ctx.report.add(
        f"c. warm sequential read via lazyfs (median of {WARM_RUNS})",
        warm,
        "MB/s",
        "native file, caches dropped",
        native_warm,
        note=f"lazyfs {warm_range}, native {native_range}",
    )
    ctx.report.add(
        "c. page-cache-hot read via lazyfs",
        _hot_throughput(mnt / BIG_FILE_NAME),
        "MB/s",
        "native file, page-cache-hot",
        _hot_throughput(big_native),
    )

    step("d. warm 4 KiB random reads")
    offsets = _random_offsets(size)
    lazy_lat = _random_read_latencies_us(mnt / BIG_FILE_NAME, offsets)
    native_lat = _random_read_latencies_us(big_native, offsets)
    _report_latencies(ctx.report, "d. 4 KiB random read", lazy_lat, native_lat, "native file")

    step("e. metadata: find and os.walk + lstat")
    _report_metadata(ctx.report, mnt, ctx.native)

    step("f. --verify-cache-reads")
    manager.unmount(mnt)
    manager.mount(ctx.ref, mnt, cache, "--verify-cache-reads")
    verified, verified_range = _median_throughput(mnt / BIG_FILE_NAME)
    ctx.report.add(
        f"f. warm sequential read, --verify-cache-reads (median of {WARM_RUNS})",
        verified,
        "MB/s",
        "same without verification (c)",
        warm,
        note=f"verified {verified_range}",
    )
    verified_lat = _random_read_latencies_us(mnt / BIG_FILE_NAME, offsets)
    _report_latencies(
        ctx.report, "f. 4 KiB random read, verified", verified_lat, lazy_lat, "without (d)"
    )
    if hashlib.sha256((mnt / BIG_FILE_NAME).read_bytes()).hexdigest() != ctx.image.big_data_sha256:
        raise RuntimeError(f"{BIG_FILE_NAME}: the mount returned different bytes")
    final = stats(mnt)
    ctx.report.fact("verification failures", final["verification_failures"])
    manager.unmount(mnt)


def _report_small(
    ctx: _Context,
    before: tuple[int, int],
    after_mount: tuple[int, int],
    after_read: tuple[int, int],
    own: dict[str, Any],
    size: int,
    mount_s: float,
    read_s: float,
) -> None:
    image_kb = ctx.image_bytes / 1000
    metadata = after_mount[0] - before[0]
    content = after_read[0] - after_mount[0]
    ctx.report.fact("small file", f"{ctx.image.small_file.name} ({size} bytes)")
    ctx.report.fact(
        "registry GETs: mount / read",
        f"{after_mount[1] - before[1]} ({metadata} B) / {after_read[1] - after_mount[1]} "
        f"({content} B)",
    )
    ctx.report.fact("lazy mount seconds (lazyfs mount returns)", round(mount_s, 3))
    ctx.report.fact("first read of the small file, ms", round(1000 * read_s, 2))
    ctx.report.add(
        "a. registry bytes for the small file's content",
        content / 1000,
        "kB",
        "image compressed size",
        image_kb,
        note=f"{100 * content / ctx.image_bytes:.4f}%",
    )
    ctx.report.add(
        "a. registry bytes incl. mount metadata (manifest, config, TOCs)",
        (metadata + content) / 1000,
        "kB",
        "image compressed size",
        image_kb,
        note=f"{100 * (metadata + content) / ctx.image_bytes:.2f}%",
    )
    ctx.report.add(
        "a. lazyfs stats bytes_fetched (content)",
        own["bytes_fetched"] / 1000,
        "kB",
        "registry access log, content",
        content / 1000,
        note=f"{100 * own['bytes_fetched'] / ctx.image_bytes:.4f}% of the image",
    )


def _full_pull_seconds(ctx: _Context) -> float:
    target = ctx.work / "pulled"
    target.mkdir()
    drop_caches()
    started = time.perf_counter()
    for index in range(len(ctx.manifest.layers)):
        pipeline = f"curl -sf '{ctx.blob_url(index)}' | zstd -dc | tar -x -C '{target}'"
        run(["bash", "-o", "pipefail", "-c", pipeline], timeout=120)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def _curl_seconds(ctx: _Context, index: int, *, decompress: bool) -> float:
    drop_caches()
    tail = " | zstd -dc > /dev/null" if decompress else " > /dev/null"
    pipeline = f"curl -sf '{ctx.blob_url(index)}'{tail}"
    started = time.perf_counter()
    run(["bash", "-o", "pipefail", "-c", pipeline], timeout=120)
    return time.perf_counter() - started


def _median_throughput(path: Path, runs: int = WARM_RUNS) -> tuple[float, str]:
    """Median MB/s of ``runs`` full reads, each after dropping caches; and the range seen."""
    speeds = []
    for _ in range(runs):
        drop_caches()
        speeds.append(mb_per_s(*read_file_seconds(path)))
    return median(speeds), f"{min(speeds):.0f}-{max(speeds):.0f}"


def _hot_throughput(path: Path) -> float:
    read_file_seconds(path)  # fill the page cache
    return mb_per_s(*read_file_seconds(path))


def _random_offsets(size: int) -> list[int]:
    rng = random.Random(_SEED)
    blocks = size // RANDOM_READ_BYTES
    return [rng.randrange(blocks) * RANDOM_READ_BYTES for _ in range(RANDOM_READS)]


def _random_read_latencies_us(path: Path, offsets: Sequence[int]) -> list[float]:
    drop_caches()
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            started = time.perf_counter_ns()
            os.pread(fd, RANDOM_READ_BYTES, offset)
            latencies.append((time.perf_counter_ns() - started) / 1000)
    finally:
        os.close(fd)
    return latencies


def _report_latencies(
    report: Report, label: str, values: list[float], baseline: list[float], baseline_name: str
) -> None:
    report.add(f"{label}, median", median(values), "µs", baseline_name, median(baseline))
    report.add(
        f"{label}, p95", percentile(values, 0.95), "µs", baseline_name, percentile(baseline, 0.95)
    )


def _report_metadata(report: Report, mnt: Path, native: Path) -> None:
    entries = _walk_count(native)
    report.fact("entries in the tree", entries)
    for label, operation in (("find", _find), ("os.walk + lstat", _walk_count)):
        for state in ("cold", "warm"):
            lazy_rate = _entries_per_s(operation, mnt, drop=state == "cold")
            native_rate = _entries_per_s(operation, native, drop=state == "cold")
            report.add(
                f"e. {label} over the mount, {state}",
                lazy_rate,
                "entries/s",
                f"native copy, {state}",
                native_rate,
            )


def _entries_per_s(operation: Callable[[Path], int], root: Path, *, drop: bool) -> float:
    if drop:
        drop_caches()
    started = time.perf_counter()
    count = operation(root)
    return count / (time.perf_counter() - started)


def _find(root: Path) -> int:
    result = subprocess.run(
        ["find", str(root)], capture_output=True, check=True, timeout=120, stdin=subprocess.DEVNULL
    )
    return result.stdout.count(b"\n")


def _walk_count(root: Path) -> int:
    count = 1
    os.lstat(root)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(directory, name))
            count += 1
    return count
