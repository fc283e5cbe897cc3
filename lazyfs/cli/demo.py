"""``lazyfs demo``: the main job on an embedded default, from nothing.

Starts a registry on loopback, builds a sample image, pushes it converted, mounts it lazily,
reads two files and prints what was fetched, then unmounts and stops the registry.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lazyfs.bench.command import lazyfs_command

if TYPE_CHECKING:
    from lazyfs.registry.localserver import LocalRegistry


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "demo", help="start a local registry, convert a sample image and mount it lazily"
    )
    parser.add_argument("--work-dir", type=Path, help="keep the registry, cache and mount here")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from lazyfs.registry.localserver import LocalRegistry  # see lazyfs/cli/common.py

    with tempfile.TemporaryDirectory(prefix="lazyfs-demo-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with LocalRegistry(work / "registry") as registry:
            _demo(work, registry)
    return 0


def _step(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


def _demo(work: Path, registry: LocalRegistry) -> None:
    from lazyfs.convert.sample import build_sample_image

    _step(f"registry running at {registry.host}")
    digest = build_sample_image(work / "sample-oci", "latest")
    _step(f"built the sample image {digest} (oci:{work / 'sample-oci'}:latest)")
    target = f"{registry.host}/sample:lazy"
    lazyfs_command("convert", "-q", f"oci:{work / 'sample-oci'}:latest", target)
    _step(f"converted and pushed it as {target}")
    mountpoint = work / "mnt"
    mountpoint.mkdir(exist_ok=True)
    started = time.monotonic()
    lazyfs_command("mount", "--cache-dir", str(work / "cache"), target, str(mountpoint))
    _step(f"mounted at {mountpoint} in {time.monotonic() - started:.2f} s")
    try:
        _read_some(mountpoint)
        stats = json.loads(lazyfs_command("stats", "--json", str(mountpoint)))
        _step(
            f"fetched {stats['bytes_fetched']} bytes in {stats['range_requests']} range requests "
            f"({stats['chunks_fetched']} chunks verified and cached)"
        )
    finally:
        lazyfs_command("umount", str(mountpoint))
        _step("unmounted")


def _read_some(mountpoint: Path) -> None:
    # Reads go through the kernel to our own daemon process, never to this process's loop.
    print((mountpoint / "etc" / "motd").read_text(), end="")
    listing = subprocess.run(
        ["ls", "-la", str(mountpoint)], capture_output=True, text=True, check=True
    )
    print(listing.stdout, end="")
