"""A small sample image, built locally and reproducibly, for ``lazyfs demo``.

Two gzip layers: a base with a few text files, a directory tree and one larger file, and an
upper layer that adds an app and deletes a base file with a whiteout. This module owns only
their contents; :mod:`lazyfs.convert.imagebuild` writes them.
"""

from __future__ import annotations

import random
from pathlib import Path

from lazyfs.convert.imagebuild import (
    ContainerConfig,
    Entry,
    regular_file,
    whiteout,
    with_parent_dirs,
    write_image,
)
from lazyfs.model.digest import Digest

_WORDS = b"lazy chunk verity layer image registry mount fetch cache digest merkle tree".split()
_CONTAINER = ContainerConfig(command=("/bin/sh", "/app/run.sh"))


def _text(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(_WORDS, k=12)) + b"\n"
    return bytes(out[:size])


def _base_layer() -> list[Entry]:
    files = [
        regular_file("etc/os-release", b'NAME="lazyfs sample"\nID=lazyfs\n'),
        regular_file("etc/motd", b"Hello from a lazily mounted image.\n"),
        regular_file("usr/share/data/big.txt", _text(8 << 20, 1)),
    ]
    files += [
        regular_file(f"usr/lib/sample/module{i:03d}.txt", _text(4096 + 97 * i, i))
        for i in range(200)
    ]
    return with_parent_dirs(files)


def _app_layer() -> list[Entry]:
    app = with_parent_dirs([regular_file("app/run.sh", b"#!/bin/sh\ncat /etc/motd\n")])
    return [*app, whiteout("etc/os-release")]


def build_sample_image(layout_dir: Path, tag: str = "latest") -> Digest:
    """Write the sample image into an OCI layout; return its manifest digest."""
    built = write_image(layout_dir, tag, [_base_layer(), _app_layer()], container=_CONTAINER)
    return built.manifest_descriptor.digest
