"""Background fill on an emulated link, against issue 13's targets (docs/benchmarks.md).

``sudo python -m lazyfs.bench.fill [--profile edge] [--image python] [--image-dir DIR]
[--work-dir DIR] [--reads 20] [--read-gaps-s 0,0.8] [--cap-fraction 0.5] [--cap-seconds 20]
[--read-cap-fraction F] [--json]``

One of ``lazyfs bench``'s images (python by default, zstd:chunked) is pushed to a
docker-registry on loopback and mounted through ``lazyfs bench``'s emulated link (network
namespace, tbf, delay proxy: :mod:`lazyfs.bench.links`; ``--profile``, edge by default:
20 Mbit/s, 150 ms). Every phase has a fresh ``lazyfs serve`` on an empty cache:

- *offline-safe*: ``lazyfs mount --fill``, timed from the mount until the image's stats say the
  fill is done (100 %). Baseline: the image's compressed bytes (its layer blobs) divided by the
  link's rate as measured in the same run. Target: at most 1.1x.
- *reads alone* and *reads during fill*: ``--reads`` files of the image's last layer (the fill
  takes them last), read whole one by one, on a mount with no prefetch, first without fill,
  then while the fill runs; once back to back, once ``0.8`` s apart (``--read-gaps-s``). A gap
  longer than the fill's pause after a miss (``PAUSE_AFTER_MISS_S``) lets the fill resume
  between reads, so each read arrives while fill requests are on the link: the worst case.
  p50 and p95 per read; target: at most 1.2x. A read that finds its file already filled is
  counted and left out. ``--read-cap-fraction`` caps that fill (``--fill-rate``) below the
  link: a fill at the link's full rate keeps the bottleneck's queue full, and every read that
  meets it waits in that queue.
- *rate cap*: ``lazyfs serve --fill-rate`` at ``--cap-fraction`` of the measured link rate;
  the bytes the link carried, sampled for ``--cap-seconds``, after the bucket's burst (least
  squares slope). Target: within 5 % of the cap.

Prints figures and verdicts; never asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.bench import IMAGE_NAMES
from lazyfs.bench.images import TAG, default_image_dir, ensure_image, skopeo
from lazyfs.bench.links import EmulatedLink, LinkCheck, LinkProfile, profile_by_name
from lazyfs.bench.modes import drop_page_cache, mount_stats
from lazyfs.bench.mountservice import mount_service, service_mount
from lazyfs.bench.runner import REPOSITORY_PREFIX, Progress, terminal_progress
from lazyfs.bench.scratch import work_dir
from lazyfs.bench.sharing import describe_check
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError, UsageError
from lazyfs.model.manifests import Manifest
from lazyfs.mount.fill import FILL_BURST_BYTES
from lazyfs.registry.localserver import LocalRegistry

OFFLINE_SAFE_GOAL = 1.1  # time to offline-safe <= 1.1 x compressed bytes / link rate
LATENCY_GOAL = 1.2  # foreground read latency during fill <= 1.2 x without
RATE_CAP_TOLERANCE = 0.05  # the cap holds within 5 %
FILL_TIMEOUT_S = 900.0
_POLL_S = 0.05
_SAMPLE_S = 0.25
_MIN_SKIP_S = 3.0
_MIN_READ_BYTES = 4 << 10
_MAX_READ_BYTES = 256 << 10


@dataclass(frozen=True)
class FillConfig:
    image_dir: Path
    work_dir: Path
    image: str = "python"
    profile: LinkProfile = field(default_factory=lambda: profile_by_name("edge"))
    reads: int = 20
    read_gaps_s: tuple[float, ...] = (0.0, 0.8)
    cap_fraction: float = 0.5
    cap_seconds: float = 20.0
    read_cap_fraction: float | None = None  # --fill-rate of the during-fill reads, of the link


@dataclass(frozen=True)
class Env:
    """The run's registry, link and image, shared by the phases."""

    registry: LocalRegistry
    link: EmulatedLink
    reference: str
    layer_bytes: int  # compressed bytes of the image: its layer blobs
    link_bytes_per_s: float  # TCP goodput measured through the link
    work: Path


# --- phases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineSafe:
    seconds: float  # from `lazyfs mount` until the fill is done
    mount_s: float
    fill_total_bytes: int
    link_bytes: int  # what the link carried down meanwhile
    rtt_s: tuple[float, ...] = ()  # probe RTTs (each a median of 15) while the fill ran


@dataclass(frozen=True)
class Mounted:
    mountpoint: Path
    mount_s: float  # how long `lazyfs mount` took
    started: float  # time.monotonic() when `lazyfs mount` was run


@contextlib.contextmanager
def _fresh_mount(
    env: Env, name: str, flags: Sequence[str], extra: Sequence[str] = ()
) -> Iterator[Mounted]:
    """A fresh ``lazyfs serve`` (``extra`` arguments) on an empty cache, the image mounted
    through it with ``flags``; page cache dropped first."""
    cache = env.work / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    drop_page_cache()
    scope, run_dir, mountpoint = env.work, env.work / f"{name}-svc", env.work / f"{name}-mnt"
    with mount_service(cache, run_dir, scope=scope, extra=extra) as service:
        started = time.monotonic()
        with service_mount(service, env.reference, mountpoint, *flags):
            yield Mounted(mountpoint, time.monotonic() - started, started)


def _fill_figures(mountpoint: Path) -> dict[str, Any]:
    fill: dict[str, Any] | None = mount_stats(mountpoint).get("fill")
    if fill is None:
        raise LazyfsError(f"{mountpoint}: the mount reports no fill")
    if fill.get("state") in ("failed", "stopped"):
        raise LazyfsError(f"the fill {fill.get('state')}: {fill.get('error', '')}")
    return fill


def _wait_filled(mountpoint: Path) -> dict[str, Any]:
    deadline = time.monotonic() + FILL_TIMEOUT_S
    while time.monotonic() < deadline:
        fill = _fill_figures(mountpoint)
        if fill.get("state") == "done" and float(fill.get("percent", 0)) >= 100:
            return fill
        time.sleep(_POLL_S)
    raise LazyfsError(f"the fill did not finish within {FILL_TIMEOUT_S:.0f} s")


def offline_safe(env: Env) -> OfflineSafe:
    """``lazyfs mount --fill`` (prefetch as configured by the image: the default) until 100 %."""
    before = env.link.counters()
    with _fresh_mount(env, "offline", ["--fill"]) as mounted, _rtt_sampler(env.link) as rtts:
        fill = _wait_filled(mounted.mountpoint)
        done = time.monotonic()
        after = env.link.counters()
    down = after.get("bytes_down", 0) - before.get("bytes_down", 0)
    # Timed from the mount request: the service is up already, as on a node.
    return OfflineSafe(
        done - mounted.started, mounted.mount_s, int(fill["total_bytes"]), down, tuple(rtts)
    )


@contextlib.contextmanager
def _rtt_sampler(link: EmulatedLink) -> Iterator[list[float]]:
    """Probe RTTs in a thread while the block runs: the queue the fill keeps in the shaper
    is what a read that meets the fill waits in."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(LazyfsError, OSError):
                samples.append(link.rtt_s())

    thread = threading.Thread(target=sample, name="rtt-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(30)
        if len(samples) > 1:
            del samples[-1]  # may have ended after the fill did


@dataclass(frozen=True)
class Reads:
    name: str
    latencies_s: tuple[float, ...]  # reads that fetched from the network
    already_cached: int  # reads whose file the fill had already fetched (left out)
    fill_percent_after: float | None = None

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return 0.0
        index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
        return ordered[index]


def pick_files(env: Env, count: int) -> list[str]:
    """``count`` files of the image's last layer (what the fill fetches last), spread over it."""
    with _fresh_mount(env, "listing", ["--no-prefetch"]) as mounted:
        sizes = _files_with_sizes(mounted.mountpoint)
        candidates = sorted(p for p, size in sizes if _MIN_READ_BYTES <= size <= _MAX_READ_BYTES)
    last_layer = [path for path in candidates if path.startswith("usr/lib/python3")]
    pool = last_layer if len(last_layer) >= count else candidates
    if len(pool) < count:
        raise UsageError(f"the image has only {len(pool)} files to read, --reads {count}")
    step = len(pool) / count
    return [pool[int(index * step)] for index in range(count)]


def _files_with_sizes(root: Path) -> Iterator[tuple[str, int]]:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            size = os.stat(path).st_size
            yield os.path.relpath(path, root), size


def _fetched(mountpoint: Path) -> int:
    return int(mount_stats(mountpoint).get("chunks_fetched") or 0)


def read_one_by_one(
    name: str, mountpoint: Path, files: Sequence[str], gap_s: float, fill: bool
) -> Reads:
    latencies, cached = [], 0
    for path in files:
        time.sleep(gap_s)
        before = _fetched(mountpoint)
        started = time.monotonic()
        with (mountpoint / path).open("rb", buffering=0) as data:
            while data.read(1 << 20):
                pass
        elapsed = time.monotonic() - started
        if _fetched(mountpoint) > before:
            latencies.append(elapsed)
        else:
            cached += 1
    percent = float(_fill_figures(mountpoint).get("percent", 0)) if fill else None
    return Reads(name, tuple(latencies), cached, percent)


def reads(
    env: Env, files: Sequence[str], gap_s: float, fill: bool, cap: float | None = None
) -> Reads:
    name = f"{'during-fill' if fill else 'alone'}-gap{gap_s:g}"
    flags = ("--no-prefetch", "--fill" if fill else "--no-fill")
    extra = ("--fill-rate", str(int(cap))) if cap is not None and fill else ()
    with _fresh_mount(env, f"reads-{name}", flags, extra) as mounted:
        if fill:
            _wait_filling(mounted.mountpoint)
        return read_one_by_one(name, mounted.mountpoint, files, gap_s, fill)


def _wait_filling(mountpoint: Path) -> None:
    deadline = time.monotonic() + FILL_TIMEOUT_S
    while time.monotonic() < deadline:
        fill = _fill_figures(mountpoint)
        if fill.get("state") == "filling" and int(fill.get("done_bytes", 0)) > 0:
            return
        time.sleep(_POLL_S)
    raise LazyfsError("the fill did not start")


@dataclass(frozen=True)
class RateCap:
    cap_bytes_per_s: float
    skip_s: float
    slope_bytes_per_s: float  # least squares over the samples after the burst
    mean_bytes_per_s: float  # the same window, first to last sample
    samples: tuple[tuple[float, int], ...]


def rate_cap(env: Env, cap: float, seconds: float) -> RateCap:
    extra = ("--fill-rate", str(int(cap)))
    with _fresh_mount(env, "cap", ["--no-prefetch", "--fill"], extra):
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < seconds:
            samples.append((time.monotonic() - started, env.link.counters().get("bytes_down", 0)))
            time.sleep(_SAMPLE_S)
    # The bucket starts full: the fill runs at the link's rate until the burst is spent.
    skip_s = max(_MIN_SKIP_S, 1.5 * FILL_BURST_BYTES / max(env.link_bytes_per_s - cap, 1.0))
    window = [(t, b) for t, b in samples if t >= skip_s]
    if len(window) < 3 or window[-1][0] - window[0][0] < 2:
        raise UsageError(f"--cap-seconds must leave 2 s after the burst ({skip_s:.1f} s)")
    slope = _slope(window)
    (t0, b0), (t1, b1) = window[0], window[-1]
    return RateCap(cap, skip_s, slope, (b1 - b0) / (t1 - t0), tuple(samples))


def _slope(points: Sequence[tuple[float, int]]) -> float:
    xs, ys = [p[0] for p in points], [float(p[1]) for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    numerator = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    denominator = sum((x - mx) ** 2 for x in xs)
    return numerator / denominator if denominator else 0.0


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FillResult:
    link: LinkCheck
    env_layer_bytes: int
    link_bytes_per_s: float
    offline: OfflineSafe
    reads: tuple[tuple[float, Reads, Reads], ...]  # (gap, alone, during fill)
    cap: RateCap
    files: tuple[str, ...]


def _layer_bytes(layout: Path) -> int:
    oci = OciLayout(layout)
    descriptor = oci.resolve(TAG)
    manifest = Manifest.parse(oci.read_blob(descriptor.digest), descriptor.media_type)
    return sum(layer.size for layer in manifest.layers)


def run(config: FillConfig, progress: Progress) -> FillResult:
    image = ensure_image(config.image, config.image_dir, progress)
    repository = f"{REPOSITORY_PREFIX}/fill-{image.name}"
    with LocalRegistry(config.work_dir / "registry") as registry:
        progress(f"registry at {registry.host}; pushing {image.chunked}")
        skopeo(
            "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
            f"oci:{image.chunked}:{TAG}", f"docker://{registry.host}/{repository}:{TAG}",
        )  # fmt: skip
        with EmulatedLink(registry.host) as link:
            link.apply(config.profile)
            check = link.check()
            progress(describe_check(check))
            env = Env(
                registry, link, f"{link.registry_host}/{repository}:{TAG}",
                _layer_bytes(image.chunked), check.measured.rate_bps / 8, config.work_dir,
            )  # fmt: skip
            progress("offline-safe: lazyfs mount --fill until the fill is done")
            offline = offline_safe(env)
            files = pick_files(env, config.reads)
            measured = []
            for gap in config.read_gaps_s:
                progress(f"reads alone, then during fill: {len(files)} files, {gap:g} s apart")
                alone = reads(env, files, gap, fill=False)
                fraction = config.read_cap_fraction
                cap = None if fraction is None else fraction * env.link_bytes_per_s
                measured.append((gap, alone, reads(env, files, gap, fill=True, cap=cap)))
            cap = config.cap_fraction * env.link_bytes_per_s
            progress(f"rate cap: --fill-rate {cap:.0f} for {config.cap_seconds} s")
            capped = rate_cap(env, cap, config.cap_seconds)
    return FillResult(
        check,
        env.layer_bytes,
        env.link_bytes_per_s,
        offline,
        tuple(measured),
        capped,
        tuple(files),
    )


# --- report ----------------------------------------------------------------------------------


def verdicts(result: FillResult) -> list[tuple[str, float, float, bool]]:
    """(goal, ratio, target, met)."""
    baseline_s = result.env_layer_bytes / result.link_bytes_per_s
    offline = result.offline.seconds / baseline_s
    cap = result.cap.slope_bytes_per_s / result.cap.cap_bytes_per_s
    return [
        ("time to offline-safe / (compressed bytes / link rate)", offline, OFFLINE_SAFE_GOAL,
         offline <= OFFLINE_SAFE_GOAL),
        *_latency_verdicts(result),
        ("link rate under --fill-rate / the cap", cap, 1 + RATE_CAP_TOLERANCE,
         abs(cap - 1) <= RATE_CAP_TOLERANCE),
    ]  # fmt: skip


def _latency_verdicts(result: FillResult) -> list[tuple[str, float, float, bool]]:
    found = []
    for gap, alone, during in result.reads:
        for name, fraction in (("p50", 0.5), ("p95", 0.95)):
            ratio = _ratio(during.percentile(fraction), alone.percentile(fraction))
            goal = f"read latency {name}, reads {gap:g} s apart, during fill / alone"
            found.append((goal, ratio, LATENCY_GOAL, ratio <= LATENCY_GOAL))
    return found


def _ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else 0.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _read_rows(gap: float, alone: Reads, during: Reads) -> list[tuple[str, str, str, str]]:
    mean_a, mean_d = (
        statistics.fmean(alone.latencies_s or [0]),
        statistics.fmean(during.latencies_s or [0]),
    )
    return [
        (f"read p50 during fill, {gap:g} s apart ({len(during.latencies_s)} reads)",
         _ms(during.percentile(0.5)), f"without fill ({len(alone.latencies_s)} reads)",
         _ms(alone.percentile(0.5))),
        ("  p95", _ms(during.percentile(0.95)), "without fill", _ms(alone.percentile(0.95))),
        ("  mean", _ms(mean_d), "without fill", _ms(mean_a)),
    ]  # fmt: skip


def table(result: FillResult) -> str:
    o, c = result.offline, result.cap
    baseline_s = result.env_layer_bytes / result.link_bytes_per_s
    rows = [
        ("time to offline-safe (mount --fill to 100 %)", f"{o.seconds:.2f} s",
         "compressed image bytes / measured link rate", f"{baseline_s:.2f} s"),
        ("  of which lazyfs mount", f"{o.mount_s:.2f} s", "", ""),
        ("  fill total (chunks of the merged tree)", f"{o.fill_total_bytes / 1e6:.2f} MB",
         "layer blobs", f"{result.env_layer_bytes / 1e6:.2f} MB"),
        ("  link bytes down meanwhile", f"{o.link_bytes / 1e6:.2f} MB", "", ""),
        (f"  RTT through the link while filling (median of {len(o.rtt_s)} probes)",
         _ms(statistics.median(o.rtt_s or [0])), "idle (the link check)",
         _ms(result.link.measured.rtt_s)),
        *(row for gap, alone, during in result.reads for row in _read_rows(gap, alone, during)),
        (f"link rate under --fill-rate (slope from {c.skip_s:.1f} s, after the burst)",
         f"{c.slope_bytes_per_s / 1e6:.3f} MB/s",
         "--fill-rate", f"{c.cap_bytes_per_s / 1e6:.3f} MB/s"),
        ("  mean over the same window", f"{c.mean_bytes_per_s / 1e6:.3f} MB/s", "", ""),
    ]  # fmt: skip
    lines = ["| figure | value | baseline | baseline value |", "|---|---:|---|---:|"]
    lines += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    lines.append("")
    for goal, ratio, target, met in verdicts(result):
        lines.append(f"goal: {goal} <= {target}: [{'met' if met else 'MISSED'}] {ratio:.3f}")
    for gap, alone, during in result.reads:
        lines.append(
            f"reads {gap:g} s apart: {during.already_cached} during fill and "
            f"{alone.already_cached} alone found their file already cached (left out); "
            f"fill at {during.fill_percent_after} % after the reads"
        )
    return "\n".join(lines)


def _reads_json(reads: Reads) -> dict[str, Any]:
    return {
        "latencies_s": [round(x, 4) for x in reads.latencies_s],
        "already_cached": reads.already_cached,
        "fill_percent_after": reads.fill_percent_after,
    }


def to_json(result: FillResult, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": ["python", "-m", "lazyfs.bench.fill", *argv],
        "link": result.link.to_json(),
        "link_bytes_per_s": round(result.link_bytes_per_s),
        "layer_bytes": result.env_layer_bytes,
        "offline_safe": vars(result.offline),
        "reads": [
            {"gap_s": gap, "alone": _reads_json(alone), "during_fill": _reads_json(during)}
            for gap, alone, during in result.reads
        ],
        "files": list(result.files),
        "rate_cap": {k: v for k, v in vars(result.cap).items() if k != "samples"}
        | {"samples": [[round(t, 3), b] for t, b in result.cap.samples]},
        "goals": [
            {"goal": goal, "ratio": round(ratio, 4), "target": target, "met": met}
            for goal, ratio, target, met in verdicts(result)
        ],
    }  # fmt: skip


# --- the command -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.fill", description=__doc__)
    parser.add_argument("--image", choices=IMAGE_NAMES, default="python", help="(python)")
    parser.add_argument("--profile", default="edge", help="link profile, as lazyfs bench's (edge)")
    parser.add_argument("--image-dir", type=Path, help="image cache (as lazyfs bench's)")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one)")
    parser.add_argument("--reads", type=int, default=20, help="files read one by one (20)")
    parser.add_argument(
        "--read-gaps-s",
        default="0,0.8",
        help="seconds between reads, one pass each (comma-separated; 0,0.8)",
    )
    parser.add_argument("--cap-fraction", type=float, default=0.5, help="of the link (0.5)")
    parser.add_argument("--cap-seconds", type=float, default=20.0, help="sampled (20)")
    parser.add_argument(
        "--read-cap-fraction",
        type=float,
        help="--fill-rate for the reads during fill, as a fraction of the link (default: none)",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args(argv)
    if not 2 <= args.reads <= 500:
        raise UsageError("--reads must be between 2 and 500")
    try:
        args.read_gaps_s = tuple(float(gap) for gap in args.read_gaps_s.split(","))
    except ValueError:
        raise UsageError(f"--read-gaps-s {args.read_gaps_s!r}: numbers, comma-separated") from None
    if not all(0 <= gap <= 10 for gap in args.read_gaps_s):
        raise UsageError("--read-gaps-s: each between 0 and 10")
    if args.read_cap_fraction is not None and not 0.05 <= args.read_cap_fraction <= 0.95:
        raise UsageError("--read-cap-fraction must be between 0.05 and 0.95")
    if not 0.05 <= args.cap_fraction <= 0.95:
        raise UsageError("--cap-fraction must be between 0.05 and 0.95")
    if not _MIN_SKIP_S + 2 <= args.cap_seconds <= 600:
        raise UsageError(f"--cap-seconds must be between {_MIN_SKIP_S + 2:g} and 600")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind: mounts released, services, link and registry stopped


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(arguments)
        if os.geteuid() != 0:
            raise LazyfsError("needs root (network namespace, FUSE mounts)")
        signal.signal(signal.SIGTERM, _interrupt)
        image_dir = (args.image_dir or default_image_dir()).resolve()
        with work_dir(args.work_dir, "lazyfs-fill-") as work:
            config = FillConfig(
                image_dir, work, args.image, profile_by_name(args.profile), args.reads,
                args.read_gaps_s, args.cap_fraction, args.cap_seconds, args.read_cap_fraction,
            )  # fmt: skip
            result = run(config, terminal_progress())
    except LazyfsError as exc:
        print(f"fill bench: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    text = f"{describe_check(result.link)}\n\n{table(result)}"
    if args.json:
        print(text, file=sys.stderr)
        json.dump(to_json(result, arguments), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
