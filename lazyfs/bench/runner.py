"""Orchestration: images, registry, emulated link, reference pass, then profiles x runs x modes.

For each image: build or find it, push it as built (gzip) and converted (zstd:chunked), then
over an unshaped link measure what its workload reads and fill its warm cache; for
``lazy-prefetch``, record the workload's access profile and push the image converted with it.
Every lazy mount, these included, goes through a ``lazyfs serve`` the bench starts for it.
For each link profile: shape the link, measure what it achieves (and say loudly when that is
off by more than 10 %), then run every mode ``runs`` times, in a fresh shuffled order each run.
A start that fails is tried again (``ATTEMPTS``), and every failed attempt is in the report.
"""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from lazyfs import __version__
from lazyfs.bench import DEFAULT_IMAGES, LAZY_PREFETCH, MODES, PODMAN_PEER
from lazyfs.bench.command import lazyfs_command
from lazyfs.bench.images import TAG, BenchImage, ensure_image
from lazyfs.bench.links import DEFAULT_PROFILES, EmulatedLink, LinkCheck, LinkProfile
from lazyfs.bench.modes import (
    CHUNKED_TAG,
    PREFETCH_TAG,
    ModeContext,
    record_profile,
    reference_pass,
    run_mode,
)
from lazyfs.bench.report import BenchResult, FailedAttempt, ImageInfo
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError
from lazyfs.model.profiles import AccessProfile
from lazyfs.registry.localserver import LocalRegistry

REPOSITORY_PREFIX = "lazyfs-bench"
ATTEMPTS = 3  # of one start (or reference pass, or profile recording) before the bench gives up

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class BenchConfig:
    images: tuple[str, ...] = DEFAULT_IMAGES
    command: tuple[str, ...] | None = None
    ready_line: str | None = None
    modes: tuple[str, ...] = MODES
    profiles: tuple[LinkProfile, ...] = tuple(DEFAULT_PROFILES.values())
    runs: int = 3
    registry: str | None = None
    work_dir: Path = Path("/var/tmp/lazyfs-bench")
    image_dir: Path = Path("/var/tmp/lazyfs-bench/images")
    seed: int = 0
    timeout_s: float = 600.0
    argv: tuple[str, ...] = field(default_factory=tuple)
    peer_store: Path | None = None  # podman-peer: the peer's layer store binary (stargz-store)


def machine() -> dict[str, str]:
    """The facts a reader needs to compare figures."""
    facts = {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "lazyfs": __version__,
    }
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os"] = line.partition("=")[2].strip('"')
        cpuinfo = Path("/proc/cpuinfo").read_text()
        facts["cpu"] = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.splitlines()
                if "model name" in line
            ),
            "unknown",
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        facts["memory"] = f"{int(meminfo[meminfo.index('MemTotal:') + 1]) / 1048576:.1f} GiB"
    except (OSError, ValueError):
        pass
    facts["lazyfs_commit"] = _commit()
    return facts


def _commit() -> str:
    """The source tree's commit, ``+dirty`` when it has uncommitted changes."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}" if head else "unknown"


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False, timeout=10
    )
    return done.stdout.strip()


def push(image: BenchImage, registry: str) -> None:
    """The image as built to ``:latest``, its conversion to ``:chunked`` (digests preserved)."""
    repository = f"{registry}/{REPOSITORY_PREFIX}/{image.name}"
    for source, tag in ((image.built_ref, TAG), (image.chunked_ref, CHUNKED_TAG)):
        argv = ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false"]
        result = subprocess.run(
            [*argv, source, f"docker://{repository}:{tag}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise LazyfsError(f"pushing {source} to {repository}:{tag}: {lines[-1]}")


def _layout_bytes(layout: Path) -> int:
    """Compressed size of the image tagged ``latest`` in ``layout`` (layers + config)."""
    from lazyfs.model.manifests import Manifest

    oci = OciLayout(layout)
    descriptor = oci.resolve(TAG)
    manifest = Manifest.parse(oci.read_blob(descriptor.digest), descriptor.media_type)
    return manifest.config.size + sum(layer.size for layer in manifest.layers)


class Bench:
    """One ``lazyfs bench``: owns the registry, the link and the work directories."""

    def __init__(self, config: BenchConfig, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.result = BenchResult(command=list(config.argv), machine=machine())
        self._rng = random.Random(config.seed)
        self._warm: dict[str, tuple[Path, int]] = {}

    def run(self) -> BenchResult:
        started = time.monotonic()
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        images = [self._image(name) for name in self.config.images]
        with ExitStack() as stack:
            registry = self.config.registry
            if registry is None:
                local = stack.enter_context(LocalRegistry(self.config.work_dir / "registry"))
                registry = local.host
                self.progress(f"registry (docker-registry) at {registry}")
            for image in images:
                self.progress(f"pushing {image.name} (gzip as :latest, zstd:chunked as :chunked)")
                push(image, registry)
                self._push_estargz(image, registry)
            link = stack.enter_context(EmulatedLink(registry))
            self.progress(
                f"emulated link: netns {link.netns}, registry at {link.registry_host} "
                f"(proxy base RTT {link.base_rtt_s * 1e3:.3f} ms)"
            )
            for image in images:
                self._reference(image, link)
                if LAZY_PREFETCH in self.config.modes:
                    self._prefetch_image(image, link, registry)
            for profile in self.config.profiles:
                self._profile(profile, images, link)
        self.result.duration_s = time.monotonic() - started
        return self.result

    def _push_estargz(self, image: BenchImage, registry: str) -> None:
        """podman-peer runs the eStargz conversion (the peer's converter), as ``:estargz``."""
        store = self.config.peer_store
        if PODMAN_PEER not in self.config.modes or store is None:
            return
        from lazyfs.bench.peerstore import ensure_estargz, push_estargz

        layout = ensure_estargz(image, store, self.config.image_dir, self.progress)
        self.progress(f"pushing {image.name} (eStargz as :estargz)")
        push_estargz(layout, f"{registry}/{REPOSITORY_PREFIX}/{image.name}")

    def _image(self, name: str) -> BenchImage:
        return ensure_image(
            name, self.config.image_dir, self.progress, self.config.command, self.config.ready_line
        )

    def _context(
        self, image: BenchImage, link: EmulatedLink, profile: str, run: int
    ) -> ModeContext:
        warm, bytes_read = self._warm.get(image.name, (self.config.work_dir / "warm", 0))
        return ModeContext(
            image=image,
            link=link,
            repository=f"{REPOSITORY_PREFIX}/{image.name}",
            work=self.config.work_dir / "run",
            warm_cache=warm,
            bytes_read=bytes_read,
            profile=profile,
            run=run,
            timeout_s=self.config.timeout_s,
            peer_store=self.config.peer_store,
        )

    def _reference(self, image: BenchImage, link: EmulatedLink) -> None:
        link.apply(DEFAULT_PROFILES["loopback"])
        warm = self.config.work_dir / f"warm-{image.name}"
        self._warm[image.name] = (warm, 0)
        self.progress(f"{image.name}: measuring what the workload reads; filling the warm cache")
        context = self._context(image, link, "reference", 0)
        step = FailedAttempt(image.name, "reference", "reference-pass", 0)
        reference = self._attempts(image.name, step, lambda: reference_pass(context))
        bytes_read, total = reference.bytes_read, reference.image_bytes
        if bytes_read <= 0:
            raise LazyfsError(f"{image.name}: the workload read nothing from the image")
        if not reference.consistent:
            self.progress(
                f"WARNING: {image.name}: bytes read differ between samples {reference.samples}: "
                "is something else dropping the page cache? Using the largest."
            )
        self._warm[image.name] = (warm, bytes_read)
        self.result.images.append(
            ImageInfo(
                image.name,
                image.command,
                image.ready_line,
                bytes_read,
                total,
                _layout_bytes(image.built),
                _layout_bytes(image.chunked),
                reference.samples,
            )
        )
        self.progress(
            f"{image.name}: the workload reads {bytes_read / 1e6:.1f} MB "
            f"of {total / 1e6:.1f} MB in the image"
        )

    def _prefetch_image(self, image: BenchImage, link: EmulatedLink, registry: str) -> None:
        """Record the workload's access profile on a cold mount, then convert the image again
        with it and push that as ``:prefetch`` (what ``lazy-prefetch`` mounts)."""
        profile = self.config.work_dir / f"profile-{image.name}.json"
        self.progress(f"{image.name}: recording the workload's access profile")
        context = self._context(image, link, "reference", 0)
        step = FailedAttempt(image.name, "reference", "record-profile", 0)
        self._attempts(image.name, step, lambda: record_profile(context, profile))
        target = f"{registry}/{REPOSITORY_PREFIX}/{image.name}:{PREFETCH_TAG}"
        self.progress(f"{image.name}: converting with the profile, pushing :{PREFETCH_TAG}")
        lazyfs_command(
            "convert", "-q", "--dest-tls-verify=false", "--prefetch", str(profile),
            image.built_ref, target,
        )  # fmt: skip
        reads = AccessProfile.load(profile).reads
        info = self.result.images[-1]
        self.result.images[-1] = replace(
            info, profile_reads=len(reads), profile_bytes=sum(r.length for r in reads)
        )
        self.progress(
            f"{image.name}: the profile reads {sum(r.length for r in reads) / 1e6:.1f} MB "
            f"in {len(reads)} chunks"
        )

    def _profile(self, profile: LinkProfile, images: list[BenchImage], link: EmulatedLink) -> None:
        link.apply(profile)
        self.progress(f"link {profile.describe()}: validating")
        check = link.check()
        self.result.links.append(check)
        self._report_check(check)
        for run in range(1, self.config.runs + 1):
            order = self._rng.sample(self.config.modes, len(self.config.modes))
            for image in images:
                for mode in order:
                    self._one(image, link, profile, run, mode)

    def _report_check(self, check: LinkCheck) -> None:
        measured = check.measured
        self.progress(
            f"link {check.profile.name}: measured {measured.rate_bps / 1e6:.1f} Mbit/s, "
            f"RTT {measured.rtt_s * 1e3:.2f} ms"
        )
        if not check.ok:
            banner = "!" * 78
            for line in (banner, *[f"!! EMULATOR OFF: {p}" for p in check.problems()], banner):
                self.progress(line)

    def _one(
        self, image: BenchImage, link: EmulatedLink, profile: LinkProfile, run: int, mode: str
    ) -> None:
        label = f"[{image.name} {profile.name} run {run}/{self.config.runs}] {mode}"
        self.progress(f"{label}: starting")
        context = self._context(image, link, profile.name, run)
        step = FailedAttempt(image.name, profile.name, mode, run)
        metrics = self._attempts(label, step, lambda: run_mode(mode, context))
        self.result.runs.append(metrics)
        service = (
            "" if metrics.service_up_s is None else f"; service up in {metrics.service_up_s:.2f} s"
        )
        self.progress(
            f"{label}: ready in {metrics.time_to_ready_s:.2f} s (mount "
            f"{metrics.time_to_mount_s:.3f} s, first byte {metrics.time_to_first_byte_s:.2f} s), "
            f"{metrics.link_bytes / 1e6:.1f} MB over the link, {metrics.range_requests} ranges"
            f"{service}"
        )

    def _attempts(self, label: str, step: FailedAttempt, action: Callable[[], T]) -> T:
        """``action()``; a failed attempt is tried again (up to ``ATTEMPTS``), loudly, and kept in
        the report: one flaky start should not cost the whole matrix, nor go unnoticed."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return action()
            except LazyfsError as exc:
                self.result.failures.append(replace(step, error=str(exc)))
                if attempt == ATTEMPTS:
                    raise
                self.progress(f"{label}: ATTEMPT {attempt} FAILED: {exc}; trying again")
        raise AssertionError("unreachable")


def terminal_progress(started: float | None = None) -> Progress:
    origin = time.monotonic() if started is None else started

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - origin:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress
