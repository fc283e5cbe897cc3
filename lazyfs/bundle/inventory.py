"""The inventory of a node: the fs-verity digests of every chunk its cache holds, compactly.

A file: the magic line, then one zstd frame of the sorted raw 32-byte digests. About 32 bytes
per chunk before compression (a million chunks: 32 MB), so that a site can send it over a thin
link and get back a bundle of only what it lacks (``lazyfs bundle export --have``).
"""

from __future__ import annotations

from pathlib import Path

import zstandard

from lazyfs.errors import BundleError, TocError
from lazyfs.formats.bounded import zstd_exact
from lazyfs.localfiles import AtomicFile
from lazyfs.model.verity import format_verity, parse_verity

MAGIC = b"LAZYFS-INVENTORY 1\n"
DIGEST_BYTES = 32
MAX_CHUNKS = 1 << 26


def write_inventory(verities: list[str], path: Path) -> int:
    """Write the inventory of ``verities`` to ``path`` (atomically); returns its size."""
    raw = b"".join(sorted({parse_verity(v) for v in verities}))
    header = len(raw).to_bytes(8, "big")
    data = MAGIC + header + zstandard.ZstdCompressor(level=10).compress(raw)
    with AtomicFile(path, f"inventory {path}") as out:
        out.write(data)
        out.commit()
    return len(data)


def read_inventory(path: Path) -> frozenset[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read inventory {path}: {exc.strerror}") from exc
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise BundleError(f"{path} is not a lazyfs inventory")
    size = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "big")
    if size % DIGEST_BYTES or size > MAX_CHUNKS * DIGEST_BYTES:
        raise BundleError(f"inventory {path} declares {size} bytes of digests")
    try:
        raw = zstd_exact(data[len(MAGIC) + 8 :], size, f"inventory {path}")
    except TocError as exc:
        raise BundleError(str(exc)) from exc
    return frozenset(format_verity(raw[i : i + DIGEST_BYTES]) for i in range(0, size, DIGEST_BYTES))
