"""Summaries of a bench: median and p95 per (image, profile, mode), goals, table, JSON, PNG."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.bench import (
    ALL_MODES,
    FULL_PULL,
    LAZY_COLD,
    LAZY_PREFETCH,
    LAZY_REMOUNT,
    LAZY_WARM,
    PODMAN_LAZYFS,
    PODMAN_PEER,
    PODMAN_PULL,
)
from lazyfs.bench.links import LinkCheck, format_rate
from lazyfs.bench.modes import RunMetrics
from lazyfs.errors import LazyfsError

METRICS = (
    "time_to_mount_s",
    "time_to_first_byte_s",
    "time_to_ready_s",
    "link_bytes",
    "link_bytes_down",
    "range_requests",
    "requests",
    "amplification",
    "daemon_cpu_s",
    "daemon_peak_rss_bytes",
)
OPTIONAL_METRICS = ("service_up_s",)  # None in modes without a service (full-pull)
WAN_RATIO_GOAL = 0.3
AMPLIFICATION_GOAL = 2.0
MOUNT_BASE_GOAL_S = 0.10  # issue 9: `lazyfs mount` ready within 0.1 s + 2 RTT
MOUNT_RTT_FACTOR = 2
WARM_READY_GOAL_S = 0.3  # issue 9: warm start on loopback, mount and workload
PODMAN_PEER_RATIO_GOAL = 0.8  # issue 10: podman-lazyfs pull + run vs podman-peer's
PODMAN_PULL_RATIO_GOAL = 0.4  # issue 10: podman-lazyfs pull + run vs podman's full pull
PODMAN_AMPLIFICATION_GOAL = 1.3  # issue 10: bytes fetched / bytes the workload reads


@dataclass(frozen=True)
class ImageInfo:
    name: str
    command: tuple[str, ...]
    ready_line: str | None
    bytes_read: int
    image_bytes: int
    built_bytes: int
    chunked_bytes: int
    bytes_read_samples: tuple[int, ...] = ()
    profile_reads: int = 0  # chunks in the recorded access profile (lazy-prefetch)
    profile_bytes: int = 0  # their uncompressed bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": list(self.command),
            "ready_line": self.ready_line,
            "bytes_read": self.bytes_read,
            "bytes_read_samples": list(self.bytes_read_samples),
            "image_bytes": self.image_bytes,
            "built_compressed_bytes": self.built_bytes,
            "chunked_compressed_bytes": self.chunked_bytes,
            "profile_reads": self.profile_reads,
            "profile_bytes": self.profile_bytes,
        }


@dataclass(frozen=True)
class FailedAttempt:
    """A start that failed and was tried again (lazyfs.bench.runner.ATTEMPTS)."""

    image: str
    profile: str
    mode: str  # or the preparation step: reference-pass, record-profile
    run: int
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    command: list[str]
    machine: dict[str, str]
    images: list[ImageInfo] = field(default_factory=list)
    links: list[LinkCheck] = field(default_factory=list)
    runs: list[RunMetrics] = field(default_factory=list)
    failures: list[FailedAttempt] = field(default_factory=list)
    duration_s: float = 0.0
    chart: str | None = None


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "p95": round(percentile(values, 0.95), 4),
    }


def groups(runs: Sequence[RunMetrics]) -> dict[tuple[str, str, str], list[RunMetrics]]:
    """Runs by (image, profile, mode): images and profiles in the order they were run, modes
    in the order of ``MODES`` (runs shuffle them)."""
    images = list(dict.fromkeys(run.image for run in runs))
    profiles = list(dict.fromkeys(run.profile for run in runs))

    def order(run: RunMetrics) -> tuple[int, int, int]:
        mode = ALL_MODES.index(run.mode) if run.mode in ALL_MODES else len(ALL_MODES)
        return images.index(run.image), profiles.index(run.profile), mode

    out: dict[tuple[str, str, str], list[RunMetrics]] = {}
    for run in sorted(runs, key=order):
        out.setdefault((run.image, run.profile, run.mode), []).append(run)
    return out


def summary(runs: Sequence[RunMetrics]) -> list[dict[str, Any]]:
    out = []
    for (image, profile, mode), members in groups(runs).items():
        metrics: dict[str, dict[str, float] | None] = {
            m: summarise([float(getattr(r, m)) for r in members]) for m in METRICS
        }
        for name in OPTIONAL_METRICS:
            values = [float(v) for r in members if (v := getattr(r, name)) is not None]
            metrics[name] = summarise(values) if values else None
        out.append(
            {"image": image, "profile": profile, "mode": mode, "runs": len(members), **metrics}
        )
    return out


@dataclass(frozen=True)
class Goal:
    image: str
    name: str
    target: str
    value: str
    met: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "goal": self.name,
            "target": self.target,
            "value": self.value,
            "met": self.met,
        }


def _ready(
    grouped: dict[tuple[str, str, str], list[RunMetrics]], key: tuple[str, str, str]
) -> list[float]:
    return [r.time_to_ready_s for r in grouped.get(key, [])]


def goals(runs: Sequence[RunMetrics], links: Sequence[LinkCheck] = ()) -> list[Goal]:
    """The issues' goals, for each image and lazy mode whose runs can answer them; the mount
    goals need the links (their configured RTT)."""
    grouped = groups(runs)
    out = []
    for image in dict.fromkeys(r.image for r in runs):
        for mode in (LAZY_COLD, LAZY_PREFETCH):
            out += _mode_goals(grouped, runs, image, mode)
        out += _service_goals(grouped, image, links)
        out += _podman_goals(grouped, runs, image)
    return out


def _podman_goals(
    grouped: dict[tuple[str, str, str], list[RunMetrics]],
    runs: Sequence[RunMetrics],
    image: str,
) -> list[Goal]:
    """Issue 10: podman through lazyfs's layer store against the peer's and a full pull (time
    to ready: pull plus run), per link; and its bytes over the link against what is read."""
    out = []
    profiles = dict.fromkeys(r.profile for r in runs if r.image == image)
    for profile in profiles:
        lazy = _ready(grouped, (image, profile, PODMAN_LAZYFS))
        for other, limit in ((PODMAN_PEER, PODMAN_PEER_RATIO_GOAL),
                             (PODMAN_PULL, PODMAN_PULL_RATIO_GOAL)):  # fmt: skip
            name = f"{profile}: {PODMAN_LAZYFS} / {other} pull + run (medians)"
            out += _ratio_goal(image, name, lazy, _ready(grouped, (image, profile, other)), limit)
    out += _amplification_goal(runs, image, PODMAN_LAZYFS, PODMAN_AMPLIFICATION_GOAL)
    return out


def _service_goals(
    grouped: dict[tuple[str, str, str], list[RunMetrics]],
    image: str,
    links: Sequence[LinkCheck],
) -> list[Goal]:
    """Issue 9: ``lazyfs mount`` with the service running, and the warm start on loopback."""
    out = []
    for check in links:
        limit = MOUNT_BASE_GOAL_S + MOUNT_RTT_FACTOR * check.profile.rtt_s
        for mode in (LAZY_COLD, LAZY_PREFETCH, LAZY_WARM, LAZY_REMOUNT):
            mounts = [r.time_to_mount_s for r in grouped.get((image, check.profile.name, mode), [])]
            name = f"{check.profile.name}: {mode} lazyfs mount (median)"
            out += _median_goal(image, name, mounts, limit, f"<= {limit:.3f} s")
    for mode in (LAZY_WARM, LAZY_REMOUNT):
        warm = _ready(grouped, (image, "loopback", mode))
        name = f"loopback: {mode} time to ready (median)"
        out += _median_goal(image, name, warm, WARM_READY_GOAL_S, f"<= {WARM_READY_GOAL_S} s")
    return out


def _mode_goals(
    grouped: dict[tuple[str, str, str], list[RunMetrics]],
    runs: Sequence[RunMetrics],
    image: str,
    mode: str,
) -> list[Goal]:
    out = _ratio_goal(
        image,
        f"wan: {mode} / full-pull time-to-ready (medians)",
        _ready(grouped, (image, "wan", mode)),
        _ready(grouped, (image, "wan", FULL_PULL)),
        WAN_RATIO_GOAL,
    )
    edge_full, edge_lazy = (
        _ready(grouped, (image, "edge", FULL_PULL)),
        _ready(grouped, (image, "edge", mode)),
    )
    if edge_full and edge_lazy:
        slowest, fastest = max(edge_lazy), min(edge_full)
        out.append(
            Goal(
                image,
                f"edge: slowest {mode} vs fastest full-pull",
                "lazy never slower",
                f"{slowest:.2f} s vs {fastest:.2f} s",
                slowest <= fastest,
            )
        )
    return out + _amplification_goal(runs, image, mode, AMPLIFICATION_GOAL)


def _ratio_goal(
    image: str, name: str, lazy: Sequence[float], baseline: Sequence[float], limit: float
) -> list[Goal]:
    """median(lazy) / median(baseline) within ``limit``; none without runs of both."""
    if not lazy or not baseline:
        return []
    ratio = statistics.median(lazy) / statistics.median(baseline)
    return [Goal(image, name, f"<= {limit}", f"{ratio:.2f}", ratio <= limit)]


def _median_goal(
    image: str, name: str, seconds: Sequence[float], limit_s: float, target: str
) -> list[Goal]:
    """The median of ``seconds`` within ``limit_s``; none without runs."""
    if not seconds:
        return []
    median = statistics.median(seconds)
    return [Goal(image, name, target, f"{median:.3f} s", median <= limit_s)]


def _amplification_goal(
    runs: Sequence[RunMetrics], image: str, mode: str, limit: float
) -> list[Goal]:
    """The worst run's bytes over the link / bytes read of ``mode`` within ``limit``."""
    amplification = [r.amplification for r in runs if r.image == image and r.mode == mode]
    if not amplification:
        return []
    worst = max(amplification)
    name = f"{mode} bytes over the link / bytes read (worst run)"
    return [Goal(image, name, f"<= {limit}", f"{worst:.2f}", worst <= limit)]


def from_json(document: dict[str, Any]) -> BenchResult:
    """The runs and images of a ``--json`` report, e.g. to draw its chart again."""
    result = BenchResult(command=document["command"], machine=document["machine"])
    result.runs = [RunMetrics(**run) for run in document["runs"]]
    for image in document["images"]:
        result.images.append(
            ImageInfo(
                image["name"], tuple(image["command"]), image["ready_line"], image["bytes_read"],
                image["image_bytes"], image["built_compressed_bytes"],
                image["chunked_compressed_bytes"],
                tuple(image.get("bytes_read_samples", ())),
                image.get("profile_reads", 0), image.get("profile_bytes", 0),
            )
        )  # fmt: skip
    result.duration_s = document.get("duration_s", 0.0)
    return result


def to_json(result: BenchResult) -> dict[str, Any]:
    return {
        "command": result.command,
        "machine": result.machine,
        "duration_s": round(result.duration_s, 1),
        "images": [image.to_json() for image in result.images],
        "links": [check.to_json() for check in result.links],
        "runs": [run.to_json() for run in result.runs],
        "failed_attempts": [failure.to_json() for failure in result.failures],
        "summary": summary(result.runs),
        "goals": [goal.to_json() for goal in goals(result.runs, result.links)],
        "chart": result.chart,
    }


# --- the terminal table ----------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _pair(values: dict[str, float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(values['median'])}/{fmt.format(values['p95'])}"


_COLUMNS = (
    ("image", "{:<8}"),
    ("link", "{:<9}"),
    ("mode", "{:<13}"),
    ("ready s", "{:>13}"),
    ("mount s", "{:>11}"),
    ("1st byte s", "{:>11}"),
    ("link MB", "{:>8}"),
    ("ranges", "{:>7}"),
    ("ampl.", "{:>6}"),
    ("cpu s", "{:>6}"),
    ("rss MB", "{:>7}"),
    ("svc up s", "{:>9}"),
)


def _row(cells: Sequence[str]) -> str:
    return "  ".join(fmt.format(cell) for (_, fmt), cell in zip(_COLUMNS, cells, strict=True))


def table(result: BenchResult) -> str:
    """Times as median/p95; the rest as medians. ``svc up s``: the mode's service started until
    it answered, outside its time to ready (``-``: no service, full-pull and podman-pull; for
    podman-peer, the peer store spawned until its mount appeared)."""
    lines = [_links_block(result.links), ""]
    lines.append(_row([name for name, _ in _COLUMNS]))
    for row in summary(result.runs):
        lines.append(
            _row(
                [
                    row["image"],
                    row["profile"],
                    row["mode"],
                    _pair(row["time_to_ready_s"]),
                    _pair(row["time_to_mount_s"]),
                    _pair(row["time_to_first_byte_s"]),
                    _mb(row["link_bytes"]["median"]),
                    f"{row['range_requests']['median']:.0f}",
                    f"{row['amplification']['median']:.2f}",
                    f"{row['daemon_cpu_s']['median']:.2f}",
                    _mb(row["daemon_peak_rss_bytes"]["median"]),
                    "-" if row["service_up_s"] is None else _pair(row["service_up_s"]),
                ]
            )
        )
    found = goals(result.runs, result.links)
    lines += ["", *_images_block(result.images), "", *_goals_block(found)]
    lines += _failures_block(result.failures)
    return "\n".join(lines)


def _links_block(checks: Sequence[LinkCheck]) -> str:
    lines = ["emulated links (configured -> measured):"]
    for check in checks:
        rate = (
            "unlimited" if check.profile.rate_bps is None else format_rate(check.profile.rate_bps)
        )
        status = "ok" if check.ok else "NOT WITHIN 10 %: " + "; ".join(check.problems())
        lines.append(
            f"  {check.profile.name:<9} {rate:>14} -> {format_rate(check.measured.rate_bps):>14}"
            f"   RTT {check.profile.rtt_s * 1000:7.2f} ms -> {check.measured.rtt_s * 1000:7.2f} ms"
            f"   {status}"
        )
    return "\n".join(lines)


def _images_block(images: Sequence[ImageInfo]) -> list[str]:
    return [
        f"{image.name}: workload reads {_mb(image.bytes_read)} MB of {_mb(image.image_bytes)} MB "
        f"(gzip image {_mb(image.built_bytes)} MB, zstd:chunked {_mb(image.chunked_bytes)} MB)"
        + (
            f"; access profile {_mb(image.profile_bytes)} MB in {image.profile_reads} chunks"
            if image.profile_reads
            else ""
        )
        for image in images
    ]


def _failures_block(failures: Sequence[FailedAttempt]) -> list[str]:
    if not failures:
        return []
    return ["", f"FAILED ATTEMPTS ({len(failures)}, each tried again):"] + [
        f"  {f.image} {f.profile} run {f.run} {f.mode}: {f.error}" for f in failures
    ]


def _goals_block(found: Sequence[Goal]) -> list[str]:
    if not found:
        return ["goals: need the wan and edge profiles with full-pull and lazy-cold"]
    return ["goals:"] + [
        f"  [{'met' if goal.met else 'MISSED'}] {goal.image}: {goal.name}: {goal.value} "
        f"(target {goal.target})"
        for goal in found
    ]


# --- the chart -------------------------------------------------------------------------------


def chart(result: BenchResult, path: Path) -> None:
    """Time-to-ready by profile (groups) and mode (bars), one panel per image; log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    except ImportError as exc:
        raise LazyfsError(
            "the chart needs matplotlib: pip install 'lazyfs[bench]' (or pass --no-chart)"
        ) from exc
    grouped = groups(result.runs)
    images = list(dict.fromkeys(r.image for r in result.runs))
    profiles = list(dict.fromkeys(r.profile for r in result.runs))
    modes = [m for m in ALL_MODES if any(r.mode == m for r in result.runs)]
    figure, axes = plt.subplots(1, len(images), figsize=(6 * len(images), 4.5), squeeze=False)
    width = 0.8 / max(len(modes), 1)
    for axis, image in zip(axes[0], images, strict=True):
        for index, mode in enumerate(modes):
            medians, errors = [], []
            for profile in profiles:
                values = _ready(grouped, (image, profile, mode)) or [0.0]
                median = statistics.median(values)
                medians.append(median)
                errors.append(percentile(values, 0.95) - median)
            positions = [p + (index - (len(modes) - 1) / 2) * width for p in range(len(profiles))]
            bars = axis.bar(
                positions, medians, width, yerr=[[0] * len(errors), errors], label=mode, capsize=3
            )
            axis.bar_label(bars, labels=[f"{m:.1f}" for m in medians], fontsize=7, padding=2)
        axis.set_xticks(range(len(profiles)), profiles)
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.set_ylabel("time to ready, s (median, bar to p95)")
        axis.set_title(f"lazyfs bench: {image}")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
