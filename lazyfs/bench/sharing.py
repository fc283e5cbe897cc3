"""Sharing: N images mounted at once in one mount service, all read at once (issue 9).

``sudo python -m lazyfs.bench.sharing [--images 10] [--image python] [--profile loopback]
[--image-dir DIR] [--work-dir DIR] [--json]``

The images are variants of one of ``lazyfs bench``'s images (python by default, zstd:chunked):
its layers, the very same blobs, plus one small layer of their own (a file
``/etc/lazyfs-variant`` that says which variant it is), as ``FROM python`` + ``COPY`` would
make them. They are pushed to a docker-registry on loopback, whose access log counts the bytes
it served, and mounted through ``lazyfs bench``'s emulated link (``--profile``, loopback by
default) from a network namespace the bench creates.

Two phases, each with a fresh ``lazyfs serve`` on an empty cache:

- *alone*: variant 0 mounted and every file of it read: what one image costs;
- *shared*: all N variants mounted, then every file of every mount read at once (one pool of
  readers, the same file of each image side by side, so the same chunks are asked for at the
  same moment).

Figures: registry bytes of *shared* against the unique bytes (*alone* plus what only the other
variants have: their manifests, configs and own layers; target at most 1.02x), the service's
RSS with N images mounted against one, and the ``lazyfs mount`` times (service running, image
not cached, page cache not dropped). Prints figures; never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, zip_longest
from pathlib import Path
from types import FrameType
from typing import Any

from lazyfs.bench import IMAGE_NAMES
from lazyfs.bench.command import lazyfs_command
from lazyfs.bench.images import TAG, default_image_dir, ensure_image, skopeo
from lazyfs.bench.links import (
    DEFAULT_PROFILES,
    EmulatedLink,
    LinkCheck,
    LinkProfile,
    profile_by_name,
)
from lazyfs.bench.modes import mount_stats, process_cost
from lazyfs.bench.mountservice import RunningService, mount_service, service_mount
from lazyfs.bench.runner import ATTEMPTS, REPOSITORY_PREFIX, Progress, terminal_progress
from lazyfs.bench.scratch import work_dir
from lazyfs.convert.imagebuild import directory, regular_file, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, ImageConfig, Manifest
from lazyfs.registry.localserver import AccessLogSummary, LocalRegistry

DEFAULT_IMAGES = 10
MAX_IMAGES = 50
DEFAULT_READERS = 16
SHARING_GOAL = 1.02  # issue 9: shared chunks cost at most 1.02x the unique bytes
VARIANT_FILE = "etc/lazyfs-variant"
_RECIPE_VERSION = "1"
_LOG_SETTLE_S = 0.5  # the registry logs a response just after sending it
_READ_BLOCK = 1 << 20


# --- the variants ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variants:
    """An OCI layout holding ``count`` variants of a base image, tagged ``v0``, ``v1``, ..."""

    layout: Path
    count: int

    @property
    def tags(self) -> list[str]:
        return [f"v{index}" for index in range(self.count)]


def ensure_variants(base: Path, dest: Path, count: int, progress: Progress) -> Variants:
    """``count`` variants of the image tagged ``latest`` in the layout ``base`` (cached)."""
    base_manifest = _manifest(OciLayout(base), TAG)
    stamp = dest / "variants.stamp"
    key = f"{base_manifest[0].digest} {count} {_RECIPE_VERSION}\n"
    if stamp.is_file() and stamp.read_text() == key:
        return Variants(dest, count)
    progress(f"building {count} variants of {base} (one small layer of their own each)")
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
        extras = _converted_extra_layers(Path(scratch), count)
        layout = OciLayout.create(dest)
        for index, extra in enumerate(extras):
            _compose(OciLayout(base), base_manifest, extra, layout, f"v{index}")
    stamp.write_text(key)
    return Variants(dest, count)


def _manifest(layout: OciLayout, tag: str) -> tuple[Descriptor, Manifest, ImageConfig]:
    descriptor = layout.resolve(tag)
    manifest = Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)
    return descriptor, manifest, ImageConfig.parse(layout.read_blob(manifest.config.digest))


def _converted_extra_layers(scratch: Path, count: int) -> list[tuple[OciLayout, str]]:
    """One-layer images of the variant file, converted to zstd:chunked by ``lazyfs convert``."""
    built, converted = scratch / "built", scratch / "converted"
    out = []
    for index in range(count):
        tag = f"v{index}"
        text = f"lazyfs bench sharing: variant {index} of {count}\n".encode()
        write_image(built, tag, [[directory("etc"), regular_file(VARIANT_FILE, text)]])
        lazyfs_command("convert", "-q", f"oci:{built}:{tag}", f"oci:{converted}:{tag}")
        out.append((OciLayout(converted), tag))
    return out


def _compose(
    base: OciLayout,
    base_image: tuple[Descriptor, Manifest, ImageConfig],
    extra: tuple[OciLayout, str],
    dest: OciLayout,
    tag: str,
) -> None:
    """The base image's layers (the same blobs) plus the extra image's layer, tagged ``tag``."""
    _, base_manifest, base_config = base_image
    extra_layout, extra_tag = extra
    _, extra_manifest, extra_config = _manifest(extra_layout, extra_tag)
    (extra_layer,) = extra_manifest.layers
    for layer in base_manifest.layers:
        _link_blob(base, dest, layer.digest)
    _link_blob(extra_layout, dest, extra_layer.digest)
    fields = json.loads(base_config.to_bytes())
    fields["history"] = [*fields.get("history", []), {"created_by": f"variant {tag}"}]
    diff_ids = [*base_config.diff_ids, *extra_config.diff_ids]
    config = ImageConfig(fields).with_diff_ids(diff_ids)
    dest.add_image(config.to_bytes(), [*base_manifest.layers, extra_layer], tag)


def _link_blob(source: OciLayout, dest: OciLayout, digest: Digest) -> None:
    target = dest.blob_path(digest)
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.blob_path(digest), target)
    except OSError:  # another file system
        shutil.copyfile(source.blob_path(digest), target)


def push_variants(variants: Variants, registry: str, repository: str) -> None:
    """Push every variant to ``registry`` (digests preserved)."""
    for tag in variants.tags:
        skopeo(
            "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
            f"oci:{variants.layout}:{tag}", f"docker://{registry}/{repository}:{tag}",
        )  # fmt: skip


# --- reading ---------------------------------------------------------------------------------


def regular_files(root: Path) -> list[str]:
    """Paths relative to ``root`` of its regular files (not symlinks), in walk order."""
    out = []
    for directory_path, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory_path, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.append(os.path.relpath(path, root))
    return out


def _read_file(path: Path) -> int:
    total = 0
    with path.open("rb", buffering=0) as data:
        for block in iter(lambda: data.read(_READ_BLOCK), b""):
            total += len(block)
    return total


def read_all_at_once(roots: Sequence[Path], readers: int) -> int:
    """Every regular file of every root, by one pool of ``readers`` threads, the same file of
    each root side by side (so that their shared chunks are wanted at the same moment)."""
    with ThreadPoolExecutor(readers) as pool:
        listings = list(pool.map(regular_files, roots))
        empty = [str(root) for root, names in zip(roots, listings, strict=True) if not names]
        if empty:  # os.walk says nothing of a mount that went away
            raise LazyfsError(f"no files to read in {', '.join(empty)}")
        per_root = [
            [root / name for name in names] for root, names in zip(roots, listings, strict=True)
        ]
        side_by_side = chain.from_iterable(zip_longest(*per_root))
        paths = [path for path in side_by_side if path is not None]
        return sum(pool.map(_read_file, paths, chunksize=8))


# --- the phases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    peak_rss_bytes: int


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM of a live process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return Memory(fields.get("VmRSS", 0), fields.get("VmHWM", 0))


@dataclass(frozen=True)
class Phase:
    """One service, some images mounted in it and read: what the registry and service say."""

    name: str
    images: int
    service_up_s: float
    mount_s: tuple[float, ...]
    read_s: float
    bytes_read: int
    registry_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    registry_requests: int = 0
    mounted: Memory = Memory(0, 0)
    after_reads: Memory = Memory(0, 0)
    cpu_s: float = 0.0
    service_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def total_registry_bytes(self) -> int:
        return sum(self.registry_bytes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "images": self.images,
            "service_up_s": round(self.service_up_s, 4),
            "mount_s": [round(t, 4) for t in self.mount_s],
            "read_s": round(self.read_s, 3),
            "bytes_read": self.bytes_read,
            "registry_bytes": self.total_registry_bytes,
            "registry_requests": self.registry_requests,
            "registry_bytes_by_path": {
                f"{method} {path}": count
                for (method, path), count in sorted(self.registry_bytes.items())
            },
            "rss_mounted_bytes": self.mounted.rss_bytes,
            "rss_after_reads_bytes": self.after_reads.rss_bytes,
            "peak_rss_bytes": self.after_reads.peak_rss_bytes,
            "service_cpu_s": round(self.cpu_s, 3),
            "service_stats": self.service_stats,
        }


_SERVICE_STATS = ("bytes_fetched", "range_requests", "chunks_fetched", "cache_hits", "memory_hits")
_IMAGE_STATS = ("bytes_fetched", "singleflight_waits")  # summed over the mounts


def run_phase(
    name: str, references: Sequence[str], registry: LocalRegistry, work: Path, readers: int
) -> Phase:
    """A fresh service on an empty cache; mount ``references``; read them all at once."""
    cache = work / f"{name}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    with mount_service(cache, work / f"{name}-service", scope=work) as service:
        idle = process_cost(service.pid)
        before = registry.access_log_summary()
        with ExitStack() as mounts:
            mount_s, roots = _mount_all(service, references, work / f"{name}-mnt", mounts)
            mounted = memory(service.pid)
            started = time.monotonic()
            bytes_read = read_all_at_once(roots, readers)
            read_s = time.monotonic() - started
            after_reads = memory(service.pid)
            stats = _stats(service, roots)
        cpu_s = process_cost(service.pid).since(idle).cpu_s
    time.sleep(_LOG_SETTLE_S)
    served, requests = _served_since(before, registry.access_log_summary())
    return Phase(
        name, len(references), service.up_s, mount_s, read_s, bytes_read, served, requests,
        mounted, after_reads, cpu_s, stats,
    )  # fmt: skip


def _stats(service: RunningService, roots: Sequence[Path]) -> dict[str, Any]:
    """The service's counters, and the images' own summed over their mounts (reads that
    waited for another image's fetch of the same chunk: ``singleflight_waits``)."""
    whole = service.stats()
    try:
        images = [mount_stats(root) for root in roots]
    except OSError as exc:
        raise LazyfsError(f"no lazyfs stats at {exc.filename}: {exc.strerror}") from exc
    return {
        **{f"service_{key}": whole.get(key) for key in _SERVICE_STATS},
        **{f"images_{key}": sum(int(i.get(key) or 0) for i in images) for key in _IMAGE_STATS},
    }


def _mount_all(
    service: RunningService, references: Sequence[str], base: Path, mounts: ExitStack
) -> tuple[tuple[float, ...], list[Path]]:
    """``lazyfs mount`` each reference (timed), released when ``mounts`` closes."""
    times, roots = [], []
    for index, reference in enumerate(references):
        mountpoint = base / str(index)
        started = time.monotonic()
        mounts.enter_context(service_mount(service, reference, mountpoint))
        times.append(time.monotonic() - started)
        roots.append(mountpoint)
    return tuple(times), roots


def _served_since(
    before: AccessLogSummary, after: AccessLogSummary
) -> tuple[Counter[tuple[str, str]], int]:
    served = after.bytes_by_request - before.bytes_by_request
    requests = sum((after.requests - before.requests).values())
    return served, requests


# --- figures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline_name,
            "baseline_value": self.baseline,
            "ratio": round(self.ratio, 4),
        }


def unique_bytes(alone: Phase, shared: Phase) -> int:
    """What N images need at the least: one image alone, plus what the registry served in the
    shared phase for requests the alone phase never made (the other variants' own parts)."""
    others_only = sum(
        count for key, count in shared.registry_bytes.items() if key not in alone.registry_bytes
    )
    return alone.total_registry_bytes + others_only


def figures(alone: Phase, shared: Phase) -> list[Figure]:
    n = shared.images
    common = sum(c for k, c in shared.registry_bytes.items() if k in alone.registry_bytes)
    return [
        Figure(f"registry bytes, {n} images read at once", shared.total_registry_bytes, "B",
               "unique bytes (1 image alone + the others' own parts)", unique_bytes(alone, shared)),
        Figure(f"registry bytes, {n} images, for what image 0 also needs", common, "B",
               "image 0 alone", alone.total_registry_bytes),
        Figure(f"bytes read through the {n} mounts", shared.bytes_read, "B",
               "bytes read through 1 mount", alone.bytes_read),
        Figure(f"service RSS, {n} images mounted and read", shared.after_reads.rss_bytes, "B",
               "1 image mounted and read", alone.after_reads.rss_bytes),
        Figure(f"service RSS, {n} images mounted, before reading", shared.mounted.rss_bytes, "B",
               "1 image mounted, before reading", alone.mounted.rss_bytes),
        Figure(f"service peak RSS (VmHWM), {n} images", shared.after_reads.peak_rss_bytes, "B",
               "1 image", alone.after_reads.peak_rss_bytes),
        Figure(f"lazyfs mount, median of {n} (service up, image not cached)",
               statistics.median(shared.mount_s), "s", "the one mount of the alone phase",
               alone.mount_s[0]),
        Figure(f"read everything, {n} images at once", shared.read_s, "s",
               "1 image alone", alone.read_s),
        Figure(f"service CPU, {n} images", shared.cpu_s, "s", "1 image", alone.cpu_s),
    ]  # fmt: skip


def _value(figure: Figure, value: float) -> str:
    if figure.unit == "B":
        return f"{value / 1e6:,.2f} MB"
    return f"{value:.3f} s"


def table(found: Sequence[Figure], shared: Phase) -> str:
    lines = ["| figure | value | baseline | baseline value | ratio |", "|---|---:|---|---:|---:|"]
    for figure in found:
        lines.append(
            f"| {figure.name} | {_value(figure, figure.value)} | {figure.baseline_name} | "
            f"{_value(figure, figure.baseline)} | {figure.ratio:.3f} |"
        )
    ratio = found[0].ratio
    verdict = "met" if ratio <= SHARING_GOAL else "MISSED"
    mounts = ", ".join(f"{t:.3f}" for t in shared.mount_s)
    stats = shared.service_stats
    lines += [
        "",
        f"goal: registry bytes <= {SHARING_GOAL} x unique bytes: [{verdict}] {ratio:.3f}",
        f"mount times, s: {mounts}",
        f"shared phase: {stats.get('service_range_requests')} range requests, "
        f"{stats.get('images_singleflight_waits')} reads waited for a fetch already in flight",
    ]
    return "\n".join(lines)


# --- the command -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SharingConfig:
    images: int
    image_dir: Path
    work_dir: Path
    readers: int = DEFAULT_READERS
    base_image: str = "python"
    profile: LinkProfile = DEFAULT_PROFILES["loopback"]


@dataclass(frozen=True)
class SharingResult:
    alone: Phase
    shared: Phase
    link: LinkCheck
    failed_attempts: tuple[str, ...] = ()


def run(config: SharingConfig, progress: Progress) -> SharingResult:
    """Images, registry, the emulated link (as ``lazyfs bench``'s), then the two phases."""
    image = ensure_image(config.base_image, config.image_dir, progress)
    variants = ensure_variants(
        image.chunked, config.image_dir / image.name / "sharing", config.images, progress
    )
    repository = f"{REPOSITORY_PREFIX}/sharing-{image.name}"
    with LocalRegistry(config.work_dir / "registry") as registry:
        progress(f"registry at {registry.host}; pushing {config.images} variants")
        push_variants(variants, registry.host, repository)
        with EmulatedLink(registry.host) as link:
            link.apply(config.profile)
            check = link.check()
            progress(describe_check(check))
            references = [f"{link.registry_host}/{repository}:{tag}" for tag in variants.tags]
            failures: list[str] = []
            alone = _phase("alone", references[:1], registry, config, progress, failures)
            shared = _phase("shared", references, registry, config, progress, failures)
    return SharingResult(alone, shared, check, tuple(failures))


def _phase(
    name: str,
    references: Sequence[str],
    registry: LocalRegistry,
    config: SharingConfig,
    progress: Progress,
    failures: list[str],
) -> Phase:
    progress(f"{name}: {len(references)} images mounted, then read at once")
    action = partial(run_phase, name, references, registry, config.work_dir, config.readers)
    return _attempts(name, action, failures, progress)


def _attempts(
    name: str, action: Callable[[], Phase], failures: list[str], progress: Progress
) -> Phase:
    """``action()``, tried again (up to ``ATTEMPTS``) when it fails, loudly and on record."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except LazyfsError as exc:
            failures.append(f"{name}: {exc}")
            if attempt == ATTEMPTS:
                raise
            progress(f"{name}: ATTEMPT {attempt} FAILED: {exc}; trying again")
    raise AssertionError("unreachable")


def describe_check(check: LinkCheck) -> str:
    measured = check.measured
    text = (
        f"link {check.profile.describe()}: measured {measured.rate_bps / 1e6:.1f} Mbit/s, "
        f"RTT {measured.rtt_s * 1e3:.2f} ms"
    )
    return text if check.ok else f"{text}: NOT WITHIN 10 %: {'; '.join(check.problems())}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.sharing", description=__doc__)
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images (10)")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS, help="threads (16)")
    parser.add_argument(
        "--image", choices=IMAGE_NAMES, default="python", help="the base image (python)"
    )
    parser.add_argument(
        "--profile", default="loopback", help="link profile, as lazyfs bench's (loopback)"
    )
    parser.add_argument("--image-dir", type=Path, help="image cache (as lazyfs bench's)")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one)")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args(argv)
    if not 2 <= args.images <= MAX_IMAGES:
        raise UsageError(f"--images must be between 2 and {MAX_IMAGES}")
    if not 1 <= args.readers <= 256:
        raise UsageError("--readers must be between 1 and 256")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind: mounts released, services and registry stopped


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if os.geteuid() != 0:
            raise LazyfsError("needs root (FUSE mounts, bind mounts)")
        signal.signal(signal.SIGTERM, _interrupt)
        image_dir = (args.image_dir or default_image_dir()).resolve()
        with work_dir(args.work_dir, "lazyfs-sharing-") as work:
            profile = profile_by_name(args.profile)
            config = SharingConfig(args.images, image_dir, work, args.readers, args.image, profile)
            result = run(config, terminal_progress())
    except LazyfsError as exc:
        print(f"sharing: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    alone, shared = result.alone, result.shared
    found = figures(alone, shared)
    text = f"{describe_check(result.link)}\n\n{table(found, shared)}"
    if result.failed_attempts:
        text += "\nFAILED ATTEMPTS (each tried again):\n" + "\n".join(result.failed_attempts)
    if args.json:
        print(text, file=sys.stderr)
        document = {
            "command": ["python", "-m", "lazyfs.bench.sharing", *(argv or sys.argv[1:])],
            "figures": [f.to_json() for f in found],
            "goal": {"target": SHARING_GOAL, "ratio": round(found[0].ratio, 4),
                     "met": found[0].ratio <= SHARING_GOAL},
            "link": result.link.to_json(),
            "failed_attempts": list(result.failed_attempts),
            "phases": [alone.to_json(), shared.to_json()],
        }  # fmt: skip
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
