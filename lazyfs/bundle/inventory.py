"""The inventory of a node: the fs-verity digests of every chunk its cache holds, compactly,
and (version 2) the digests of the blobs it holds (manifests, configs, TOCs) with its zstd
library, so that an exporter can send a TOC as a delta against one the node has (tocdelta.py).

Version 1: the magic line, the byte count (8 bytes, big-endian), then one zstd frame of the
sorted raw 32-byte digests. Version 2: its magic line, an 8-byte length and a JSON header
(``chunk_bytes``, ``chunk_frame_bytes``, ``blob_bytes``, ``zstd``), then the chunks' frame as
in version 1 and a frame of the sorted raw sha256 digests of the blobs. About 32 bytes per
chunk before compression (a million chunks: 32 MB), so that a site can send it over a thin link
and get back a bundle of only what it lacks (``lazyfs bundle export --have``). Version 1 is
still written when there are no blobs to list, and both are read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from lazyfs.bundle.tocdelta import zstd_library
from lazyfs.errors import BundleError, TocError
from lazyfs.formats.bounded import zstd_exact
from lazyfs.localfiles import AtomicFile
from lazyfs.model.verity import format_verity, parse_verity

MAGIC = b"LAZYFS-INVENTORY 1\n"
MAGIC_2 = b"LAZYFS-INVENTORY 2\n"
DIGEST_BYTES = 32
MAX_CHUNKS = 1 << 26
MAX_BLOBS = 1 << 24
_MAX_HEADER_BYTES = 4096
_BLOB_PREFIX = "blob:sha256:"
_BLOB_KEY = re.compile(r"blob:sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Inventory:
    chunks: frozenset[str]  # fs-verity digests
    blobs: frozenset[str] = frozenset()  # metadata cache keys, blob:sha256:...
    zstd: str = ""  # the node's zstd library (tocdelta.zstd_library), "" if unknown


def blob_keys(meta_keys: Iterable[str]) -> list[str]:
    """The blob keys among a cache's metadata keys (manifests, configs, TOCs)."""
    return [key for key in meta_keys if _BLOB_KEY.fullmatch(key)]


def write_inventory(verities: list[str], path: Path, blobs: Iterable[str] = ()) -> int:
    """Write the inventory of ``verities`` (and ``blobs``, cache keys) to ``path``
    (atomically); returns its size."""
    raw = b"".join(sorted({parse_verity(v) for v in verities}))
    frame = zstandard.ZstdCompressor(level=10).compress(raw)
    held = sorted({bytes.fromhex(key.removeprefix(_BLOB_PREFIX)) for key in blob_keys(blobs)})
    if held:
        blob_raw = b"".join(held)
        header = json.dumps(
            {
                "chunk_bytes": len(raw),
                "chunk_frame_bytes": len(frame),
                "blob_bytes": len(blob_raw),
                "zstd": zstd_library(),
            }
        ).encode()
        blob_frame = zstandard.ZstdCompressor(level=10).compress(blob_raw)
        data = MAGIC_2 + len(header).to_bytes(8, "big") + header + frame + blob_frame
    else:
        data = MAGIC + len(raw).to_bytes(8, "big") + frame
    with AtomicFile(path, f"inventory {path}") as out:
        out.write(data)
        out.commit()
    return len(data)


def read_inventory(path: Path) -> frozenset[str]:
    """The chunks an inventory lists (either version)."""
    return read_inventory_file(path).chunks


def read_inventory_file(path: Path) -> Inventory:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read inventory {path}: {exc.strerror}") from exc
    if data.startswith(MAGIC_2):
        return _version_2(data, path)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise BundleError(f"{path} is not a lazyfs inventory")
    size = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "big")
    return Inventory(_digests(data[len(MAGIC) + 8 :], size, MAX_CHUNKS, path))


def _version_2(data: bytes, path: Path) -> Inventory:
    start = len(MAGIC_2) + 8
    length = int.from_bytes(data[len(MAGIC_2) : start], "big")
    if len(data) < start or length > _MAX_HEADER_BYTES:
        raise BundleError(f"inventory {path}: malformed header")
    try:
        header = json.loads(data[start : start + length])
        chunk_bytes, frame_bytes = int(header["chunk_bytes"]), int(header["chunk_frame_bytes"])
        blob_bytes, library = int(header["blob_bytes"]), str(header["zstd"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise BundleError(f"inventory {path}: malformed header: {exc}") from exc
    body = start + length
    if not 0 <= frame_bytes <= len(data) - body:
        raise BundleError(f"inventory {path}: the chunks' frame is out of bounds")
    chunks = _digests(data[body : body + frame_bytes], chunk_bytes, MAX_CHUNKS, path)
    blobs = _digests(data[body + frame_bytes :], blob_bytes, MAX_BLOBS, path, raw=True)
    return Inventory(chunks, frozenset(_BLOB_PREFIX + b for b in blobs), library)


def _digests(frame: bytes, size: int, most: int, path: Path, raw: bool = False) -> frozenset[str]:
    if size < 0 or size % DIGEST_BYTES or size > most * DIGEST_BYTES:
        raise BundleError(f"inventory {path} declares {size} bytes of digests")
    try:
        data = zstd_exact(frame, size, f"inventory {path}")
    except TocError as exc:
        raise BundleError(str(exc)) from exc
    pieces = (data[i : i + DIGEST_BYTES] for i in range(0, size, DIGEST_BYTES))
    return frozenset(piece.hex() if raw else format_verity(piece) for piece in pieces)
