"""The ways a container can start, each measured from a cold page cache.

- ``full-pull``: ``skopeo copy`` the gzip image from the registry to a local OCI layout,
  ``umoci unpack`` it, run the workload on the unpacked tree;
- ``lazy-cold``: ``lazyfs mount`` the converted image with an empty cache, run the workload;
- ``lazy-prefetch``: the same, with the image converted with an access profile of the workload
  (recorded once, on another mount, by :func:`record_profile`), so the mount prefetches what
  the workload will read (lazyfs/mount/prefetch.py);
- ``lazy-warm``: a new mount of an image the service holds in its cache, whole (a service
  started on that cache: it has to read the image's TOCs back from the cache);
- ``lazy-remount``: the same cache, and a service that has mounted the image once already
  (untimed, released before the page-cache drop), as a node's long-running service has: it
  keeps recently released images indexed, so the mount fetches the manifest only;
- ``podman-pull``, ``podman-lazyfs``, ``podman-peer``: podman pulls and runs the image
  (:mod:`lazyfs.bench.podmanmodes`).

The lazy modes run as a node would: a ``lazyfs serve`` for the mode's cache is started first
(:mod:`lazyfs.bench.mountservice`; its start-up, *service up*, is a figure of its own), then
the page cache is dropped, then the timed part: ``lazyfs mount --socket S`` and the workload.
Daemon CPU is the service's over the timed part, peak RSS its high-water mark.

Everything that fetches goes through the emulated link (``link.registry_host``). Each mode
returns a :class:`RunMetrics`; times are seconds from the start of the timed part (just after
the page cache was dropped), bytes and requests are what the link's proxy saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench import FULL_PULL, LAZY_COLD, LAZY_PREFETCH, LAZY_REMOUNT, LAZY_WARM
from lazyfs.bench.images import TAG, BenchImage
from lazyfs.bench.links import EmulatedLink
from lazyfs.bench.mountservice import RunningService, mount_service, service_mount
from lazyfs.bench.workload import WorkloadResult, WorkloadSpec, run_workload
from lazyfs.errors import LazyfsError

CHUNKED_TAG = "chunked"
PREFETCH_TAG = "prefetch"
_TOOL_TIMEOUT_S = 1800.0
_TUNE_WAIT_S = 5.0
_LAZYFS_READ_AHEAD_KB = "1024"
_READ_BLOCK = 1 << 20
_FILL_READERS = 8
_REFERENCE_SAMPLES = 2
_PROFILE_WAIT_S = 30.0
_PROFILE_POLL_S = 0.05


@dataclass(frozen=True)
class RunMetrics:
    """One mode, on one link profile, in one run."""

    image: str
    profile: str
    mode: str
    run: int
    time_to_mount_s: float
    time_to_first_byte_s: float
    time_to_ready_s: float
    link_bytes: int
    link_bytes_down: int
    link_bytes_up: int
    requests: int
    blob_requests: int
    range_requests: int
    bytes_read: int
    amplification: float
    daemon_cpu_s: float
    daemon_peak_rss_bytes: int
    workload_cpu_s: float
    lazyfs_bytes_fetched: int | None
    lazyfs_range_requests: int | None
    service_up_s: float | None = None  # lazy modes: `lazyfs serve` spawned until it answered

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModeContext:
    """What every mode needs: the image, the link, where to work, the warm cache."""

    image: BenchImage
    link: EmulatedLink
    repository: str
    work: Path
    warm_cache: Path
    bytes_read: int
    profile: str
    run: int
    timeout_s: float
    peer_store: Path | None = None  # the peer's layer store binary (podman-peer)

    def reference(self, tag: str) -> str:
        return f"{self.link.registry_host}/{self.repository}:{tag}"

    def spec(self, lower: Path, *, measure_resident: bool = False) -> WorkloadSpec:
        return WorkloadSpec(
            lower=str(lower),
            command=self.image.command,
            ready_line=self.image.ready_line,
            timeout_s=self.timeout_s,
            scratch=str(self.work),
            measure_resident=measure_resident,
        )


@dataclass
class ProcessCost:
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0

    def add(self, other: ProcessCost) -> None:
        self.cpu_s += other.cpu_s
        self.peak_rss_bytes = max(self.peak_rss_bytes, other.peak_rss_bytes)

    def since(self, earlier: ProcessCost) -> ProcessCost:
        """CPU spent after ``earlier`` was taken; the peak RSS as it is now."""
        return ProcessCost(self.cpu_s - earlier.cpu_s, self.peak_rss_bytes)


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise LazyfsError(f"cannot drop the page cache (needs root): {exc}") from exc


def run_measured(
    argv: list[str],
    log: Path,
    timeout_s: float = _TOOL_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> ProcessCost:
    """Run ``argv`` to completion (``env``: its environment, else ours); its CPU time and peak
    RSS (from wait4)."""
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    pidfd = os.pidfd_open(process.pid)
    try:
        if not select.select([pidfd], [], [], timeout_s)[0]:
            process.kill()
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        os.close(pidfd)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LazyfsError(f"{argv[0]} failed ({process.returncode}): {tail[0]}")
    return ProcessCost(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def process_cost(pid: int) -> ProcessCost:
    """CPU seconds and peak RSS (VmHWM) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise LazyfsError(f"process {pid} is gone: {exc}") from exc
    fields = stat.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    hwm = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
    return ProcessCost(ticks / os.sysconf("SC_CLK_TCK"), int(hwm) * 1024)


# --- lazyfs mounts ---------------------------------------------------------------------------


def mount_stats(mountpoint: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(os.getxattr(mountpoint, "user.lazyfs.stats"))
    return stats


def _service(
    ctx: ModeContext, cache_dir: Path
) -> contextlib.AbstractContextManager[RunningService]:
    """The mode's own ``lazyfs serve``, its run dir under the work dir."""
    return mount_service(cache_dir, ctx.work / "service", scope=ctx.work)


def _read_ahead_file(mountpoint: Path) -> Path:
    device = os.stat(mountpoint).st_dev
    return Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")


def set_read_ahead(mountpoint: Path, kilobytes: int, *, after_lazyfs: bool = False) -> None:
    """Set the mount's read-ahead; ``after_lazyfs``: first wait until lazyfs has set its own
    (it tunes it once, just after the mount is ready), so ours is not overwritten."""
    bdi = _read_ahead_file(mountpoint)
    deadline = time.monotonic() + (_TUNE_WAIT_S if after_lazyfs else 0)
    while time.monotonic() < deadline and bdi.read_text().strip() != _LAZYFS_READ_AHEAD_KB:
        time.sleep(0.02)
    bdi.write_text(f"{kilobytes}\n")


def _regular_files(root: Path) -> Iterator[str]:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def _read_file(path: str) -> int:
    total = 0
    with open(path, "rb", buffering=0) as data:
        for block in iter(lambda: data.read(_READ_BLOCK), b""):
            total += len(block)
    return total


def read_everything(root: Path) -> int:
    """Read every regular file under ``root`` with a few readers in parallel (fills a lazyfs
    cache; lazyfs fetches for concurrent readers concurrently); the bytes read."""
    with ThreadPoolExecutor(_FILL_READERS) as pool:
        return sum(pool.map(_read_file, _regular_files(root), chunksize=16))


# --- the modes -------------------------------------------------------------------------------


def _metrics(
    ctx: ModeContext,
    mode: str,
    started: float,
    mounted: float,
    result: WorkloadResult,
    traffic: tuple[dict[str, int], dict[str, int]],
    cost: ProcessCost,
    stats: dict[str, Any] | None,
    service_up_s: float | None = None,
) -> RunMetrics:
    before, after = traffic

    def delta(key: str) -> int:
        return after.get(key, 0) - before.get(key, 0)

    down, up = delta("bytes_down"), delta("bytes_up")
    return RunMetrics(
        image=ctx.image.name,
        profile=ctx.profile,
        mode=mode,
        run=ctx.run,
        time_to_mount_s=round(mounted - started, 4),
        time_to_first_byte_s=round(result.t_first_byte - started, 4),
        time_to_ready_s=round(result.t_ready - started, 4),
        link_bytes=down + up,
        link_bytes_down=down,
        link_bytes_up=up,
        requests=delta("requests"),
        blob_requests=delta("blob_requests"),
        range_requests=delta("range_requests"),
        bytes_read=ctx.bytes_read,
        amplification=round(down / ctx.bytes_read, 3) if ctx.bytes_read else 0.0,
        daemon_cpu_s=round(cost.cpu_s, 3),
        daemon_peak_rss_bytes=cost.peak_rss_bytes,
        workload_cpu_s=result.workload_cpu_s,
        lazyfs_bytes_fetched=None if stats is None else int(stats["bytes_fetched"]),
        lazyfs_range_requests=None if stats is None else int(stats["range_requests"]),
        service_up_s=None if service_up_s is None else round(service_up_s, 4),
    )


def full_pull(ctx: ModeContext) -> RunMetrics:
    """skopeo copy + umoci unpack through the link, then the workload on the unpacked tree."""
    layout, bundle, log = ctx.work / "layout", ctx.work / "bundle", ctx.work / "full-pull.log"
    drop_page_cache()
    before = ctx.link.counters()
    started = time.monotonic()
    cost = run_measured(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{ctx.reference(TAG)}", f"oci:{layout}:{TAG}"],
        log,
    )  # fmt: skip
    cost.add(run_measured(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)], log))
    mounted = time.monotonic()
    result = run_workload(ctx.spec(bundle / "rootfs"))
    after = ctx.link.counters()
    return _metrics(ctx, FULL_PULL, started, mounted, result, (before, after), cost, None)


def _lazy(
    ctx: ModeContext,
    mode: str,
    cache_dir: Path,
    tag: str = CHUNKED_TAG,
    *,
    mounted_before: bool = False,
) -> RunMetrics:
    """Service up first (not timed), then drop the page cache; timed: mount and workload.
    ``mounted_before``: the service mounts and releases the image once before the drop."""
    mountpoint = ctx.work / "mnt"
    with _service(ctx, cache_dir) as service:
        if mounted_before:
            with service_mount(service, ctx.reference(tag), mountpoint):
                pass
        drop_page_cache()
        idle = process_cost(service.pid)
        before = ctx.link.counters()
        started = time.monotonic()
        with service_mount(service, ctx.reference(tag), mountpoint):
            mounted = time.monotonic()
            result = run_workload(ctx.spec(mountpoint))
            after = ctx.link.counters()
            stats = mount_stats(mountpoint)
            cost = process_cost(service.pid).since(idle)
    traffic = (before, after)
    return _metrics(ctx, mode, started, mounted, result, traffic, cost, stats, service.up_s)


def lazy_cold(ctx: ModeContext) -> RunMetrics:
    return _lazy(ctx, LAZY_COLD, ctx.work / "cache")


def lazy_prefetch(ctx: ModeContext) -> RunMetrics:
    return _lazy(ctx, LAZY_PREFETCH, ctx.work / "cache", PREFETCH_TAG)


def lazy_warm(ctx: ModeContext) -> RunMetrics:
    return _lazy(ctx, LAZY_WARM, ctx.warm_cache)


def lazy_remount(ctx: ModeContext) -> RunMetrics:
    return _lazy(ctx, LAZY_REMOUNT, ctx.warm_cache, mounted_before=True)


RUNNERS: dict[str, Callable[[ModeContext], RunMetrics]] = {
    FULL_PULL: full_pull,
    LAZY_COLD: lazy_cold,
    LAZY_PREFETCH: lazy_prefetch,
    LAZY_WARM: lazy_warm,
    LAZY_REMOUNT: lazy_remount,
}


def run_mode(mode: str, ctx: ModeContext) -> RunMetrics:
    """Run ``mode`` in a fresh work directory (it drops the page cache just before its timed
    part), clean up after it."""
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    try:
        return _runner(mode)(ctx)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)


def _runner(mode: str) -> Callable[[ModeContext], RunMetrics]:
    if mode in RUNNERS:
        return RUNNERS[mode]
    from lazyfs.bench.podmanmodes import RUNTIME_RUNNERS  # it imports this module

    return RUNTIME_RUNNERS[mode]


@dataclass(frozen=True)
class Reference:
    """What the reference pass found: bytes the workload reads (each sample, and the one
    used), and the bytes of every file in the image."""

    samples: tuple[int, ...]
    image_bytes: int

    @property
    def bytes_read(self) -> int:
        return max(self.samples)

    @property
    def consistent(self) -> bool:
        """Samples within 5 %: nothing else dropped the page cache in the middle."""
        return min(self.samples) >= 0.95 * max(self.samples)


def reference_pass(ctx: ModeContext, samples: int = _REFERENCE_SAMPLES) -> Reference:
    """Measure what the workload reads, and fill the warm cache with the whole image.

    Mounts with the warm cache and turns read-ahead off; then, ``samples`` times, drops the
    page cache, runs the workload and counts the image's bytes in the page cache
    (page-granular, read or mapped). A page-cache drop by anything else on the machine between
    the workload and the count can only lower a sample, so the largest one is used. Then it
    reads every file, so that the cache holds all of the image."""
    shutil.rmtree(ctx.warm_cache, ignore_errors=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    mountpoint = ctx.work / "reference-mnt"
    found = []
    try:
        with (
            _service(ctx, ctx.warm_cache) as service,
            service_mount(service, ctx.reference(CHUNKED_TAG), mountpoint),
        ):
            set_read_ahead(mountpoint, 0, after_lazyfs=True)
            for _ in range(samples):
                drop_page_cache()
                result = run_workload(ctx.spec(mountpoint, measure_resident=True))
                found.append(result.resident_bytes or 0)
            set_read_ahead(mountpoint, int(_LAZYFS_READ_AHEAD_KB))
            total = read_everything(mountpoint)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    return Reference(tuple(found), total)


def record_profile(ctx: ModeContext, profile: Path) -> None:
    """Record the workload's access profile: one start on a cold mount of the converted image,
    as a user would (``lazyfs mount --record-profile``, then unmount)."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    profile.unlink(missing_ok=True)
    mountpoint = ctx.work / "profile-mnt"
    options = ("--no-prefetch", "--record-profile", str(profile))
    try:
        with _service(ctx, ctx.work / "profile-cache") as service:
            with service_mount(service, ctx.reference(CHUNKED_TAG), mountpoint, *options):
                drop_page_cache()
                run_workload(ctx.spec(mountpoint))
            _wait_for_file(profile, _PROFILE_WAIT_S)  # the service writes it after the release
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    if not profile.is_file():
        raise LazyfsError(f"{ctx.image.name}: the mount wrote no access profile")


def _wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(_PROFILE_POLL_S)
