"""``lazyfs bench``: container cold start, full pull vs lazy, over emulated links.

See lazyfs/bench/ for how it measures, and docs/benchmarks.md for results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

# Only names here: the bench modules are imported when the command runs, so other lazyfs
# commands (``lazyfs mount`` above all, which the bench times) do not pay for them.
from lazyfs.bench import (
    ALL_MODES,
    DEFAULT_IMAGES,
    IMAGE_NAMES,
    MODES,
    PODMAN_PEER,
    PROFILE_NAMES,
    RUNTIME_MODES,
)
from lazyfs.errors import LazyfsError, UsageError

if TYPE_CHECKING:
    from lazyfs.bench.links import LinkProfile
    from lazyfs.bench.runner import BenchConfig

_MAX_RUNS = 100
_HOSTPORT = re.compile(r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure container cold start: full pull vs lazy mounts, over emulated links",
        description="Measure container cold start (time to ready, bytes over the link, ...) in "
        "the modes full-pull, lazy-cold, lazy-prefetch and lazy-warm, over emulated links. "
        "Needs root "
        "(network namespaces, tc, mounts, dropping the page cache).",
    )
    parser.add_argument(
        "images",
        metavar="IMAGE",
        nargs="*",
        help=f"built-in image ({', '.join(IMAGE_NAMES)}) or oci:PATH[:TAG] "
        f"(default: {' '.join(DEFAULT_IMAGES)})",
    )
    parser.add_argument("--workload", help="command to run, shell syntax (default: the image's)")
    parser.add_argument("--ready-line", help="ready when this appears on the output, not at exit")
    parser.add_argument(
        "--mode",
        action="append",
        help=f"modes, comma-separated (default: {','.join(MODES)}; runtime modes: "
        f"{','.join(RUNTIME_MODES)})",
    )
    parser.add_argument(
        "--peer-store",
        type=Path,
        metavar="PATH",
        help=f"the peer's layer store binary (stargz-store, with estargz-conv beside it): adds "
        f"the mode {PODMAN_PEER}",
    )
    parser.add_argument(
        "--profile",
        action="append",
        help=f"link profiles, comma-separated (default: {','.join(PROFILE_NAMES)}, "
        "or none when --link is given)",
    )
    parser.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="rate=RATE,rtt=TIME[,name=NAME]",
        help="a custom link, e.g. rate=50mbit,rtt=80ms (repeatable)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per mode and link (default 3)")
    parser.add_argument(
        "--registry", metavar="HOST:PORT", help="use this (plain HTTP) registry, not a local one"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout; the table on stderr")
    parser.add_argument(
        "--chart", type=Path, default=Path("lazyfs-bench.png"), help="PNG chart path"
    )
    parser.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a new one)")
    parser.add_argument(
        "--image-dir", type=Path, help="image cache (default ~/.cache/lazyfs/bench/images)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the mode order shuffle")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a workload may take (default 600)"
    )
    parser.set_defaults(handler=run_bench)


def _split(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def select_profiles(names: list[str] | None, links: list[str]) -> tuple[LinkProfile, ...]:
    """Named profiles, then custom links; all defaults when neither is given."""
    from lazyfs.bench.links import DEFAULT_PROFILES, parse_link, profile_by_name

    chosen = [profile_by_name(name) for name in _split(names)]
    customs = [parse_link(text) for text in links]
    if not chosen and not customs:
        chosen = list(DEFAULT_PROFILES.values())
    profiles = [*chosen, *customs]
    names_seen = [p.name for p in profiles]
    duplicates = sorted({n for n in names_seen if names_seen.count(n) > 1})
    if duplicates:
        raise UsageError(f"link profile named twice: {', '.join(duplicates)} (use name=)")
    return tuple(profiles)


def select_modes(values: list[str] | None, peer_store: Path | None = None) -> tuple[str, ...]:
    """The modes asked for (default: MODES); ``podman-peer`` with a peer store, and only then."""
    modes = _split(values) or list(MODES)
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise UsageError(f"unknown mode {unknown[0]!r} (known: {', '.join(ALL_MODES)})")
    if peer_store is not None:
        modes.append(PODMAN_PEER)
    elif PODMAN_PEER in modes:
        raise UsageError(f"mode {PODMAN_PEER} needs --peer-store PATH")
    return tuple(dict.fromkeys(modes))


def check_peer_store(path: Path | None) -> Path | None:
    """The peer binary and the converter beside it must be executable files."""
    if path is None:
        return None
    from lazyfs.bench.peerstore import converter_beside

    for binary in (path, converter_beside(path)):
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise UsageError(f"--peer-store {path}: {binary} is not an executable file")
    return path.resolve()


def check_runtime_tools(modes: tuple[str, ...]) -> None:
    if not set(modes) & set(RUNTIME_MODES):
        return
    from lazyfs.bench.podmanmodes import missing_tools

    missing = missing_tools()
    if missing:
        raise LazyfsError(
            f"the podman modes need {' and '.join(missing)} (make setup installs them)"
        )


def build_config(args: argparse.Namespace, work_dir: Path) -> BenchConfig:
    from lazyfs.bench.images import default_image_dir
    from lazyfs.bench.runner import BenchConfig

    if not 1 <= args.runs <= _MAX_RUNS:
        raise UsageError(f"--runs must be between 1 and {_MAX_RUNS}")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if args.registry is not None and not _HOSTPORT.match(args.registry):
        raise UsageError(f"--registry {args.registry!r}: expected HOST:PORT")
    command = tuple(shlex.split(args.workload)) if args.workload else None
    if args.workload is not None and not command:
        raise UsageError("--workload is empty")
    images = tuple(args.images) or DEFAULT_IMAGES
    if command is not None and len(images) != 1:
        raise UsageError("--workload applies to one image; name exactly one")
    _check_images(images)
    peer_store = check_peer_store(args.peer_store)
    modes = select_modes(args.mode, peer_store)
    return BenchConfig(
        images=images,
        command=command,
        ready_line=args.ready_line,
        modes=modes,
        profiles=select_profiles(args.profile, args.link),
        runs=args.runs,
        registry=args.registry,
        work_dir=work_dir,
        image_dir=(args.image_dir or default_image_dir()).resolve(),
        seed=args.seed,
        timeout_s=args.timeout,
        argv=("lazyfs", *args.raw_argv),
        peer_store=peer_store,
    )


def _check_images(images: tuple[str, ...]) -> None:
    for name in images:
        if name.startswith("oci:"):
            path = name.removeprefix("oci:").partition(":")[0]
            if not (Path(path) / "index.json").is_file():
                raise UsageError(f"image {name}: no OCI layout at {path}")
        elif name not in IMAGE_NAMES:
            known = ", ".join(IMAGE_NAMES)
            raise UsageError(f"unknown image {name!r} (built-in: {known}, or oci:PATH[:TAG])")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so namespaces, mounts and processes are cleaned up."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(args: argparse.Namespace) -> int:
    from lazyfs.bench.report import chart, table, to_json
    from lazyfs.bench.runner import Bench, terminal_progress
    from lazyfs.bench.scratch import work_dir

    config = build_config(args, Path())
    check_runtime_tools(config.modes)
    if os.geteuid() != 0:
        raise LazyfsError("lazyfs bench needs root (network namespaces, tc, mounts)")
    with work_dir(args.work_dir, "lazyfs-bench-") as work:
        with _terminate_as_interrupt():
            result = Bench(replace(config, work_dir=work), terminal_progress()).run()
        if not args.no_chart:
            chart(result, args.chart)
            result.chart = str(args.chart)
    text = table(result)
    if args.json:
        print(text, file=sys.stderr)
        json.dump(to_json(result), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)
        if result.chart:
            print(f"\nchart: {result.chart}")
    return 0
