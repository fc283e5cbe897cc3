"""Localize a layer: its whole blob, verified, decompressed, and written as zstd:chunked.

The one pipeline behind both ``lazyfs convert`` (every layer it converts) and ``lazyfs mount``
(plain layers, which cannot be read lazily: each is fetched whole once and converted on the
node). Blocking steps run in worker threads: zlib and zstandard release the GIL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from lazyfs.config import ChunkingConfig
from lazyfs.errors import IntegrityError
from lazyfs.formats.chunked.order import MemberOrder, profile_first_order, write_member_order
from lazyfs.formats.chunked.writer import ChunkedLayer, write_chunked_layer
from lazyfs.formats.plain import decompress_layer
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, layer_compression
from lazyfs.model.profiles import AccessProfile

# Given a scratch path, bring the blob to a local file and return that file's path (the
# scratch path, or a file the source already has). Its digest is checked while decompressing.
FetchBlob = Callable[[Path], Awaitable[Path]]
# (phase, bytes done, bytes in all): phases "decompress", "reorder" (with a profile) and
# "convert".
PhaseProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LocalizedLayer:
    layer: ChunkedLayer
    path: Path  # the zstd:chunked blob, in the scratch directory
    order: MemberOrder | None = None  # the profile-first order, when converted with a profile


async def localize_layer(
    source: Descriptor,
    fetch_blob: FetchBlob,
    scratch: Path,
    chunking: ChunkingConfig,
    *,
    diff_id: Digest | None = None,
    prefetch: AccessProfile | None = None,
    progress: PhaseProgress | None = None,
) -> LocalizedLayer:
    """Convert layer ``source``; ``diff_id``, when given, is what its tar must hash to.

    With an access profile (``prefetch``), the files it reads come first in the layer
    (formats/chunked/order.py): the tar changes, and so does the layer's diff_id
    (``layer.diff_id``), and the TOC carries the profile's ranks."""
    compression = layer_compression(source.media_type)  # UnsupportedMediaTypeError if unknown
    blob_path = await fetch_blob(scratch / "source.blob")
    tar_path = scratch / "layer.tar"
    actual = await anyio.to_thread.run_sync(
        decompress_layer,
        blob_path,
        compression,
        source.digest,
        tar_path,
        _reporter(progress, "decompress", source.size),
    )
    if diff_id is not None and actual != diff_id:
        raise IntegrityError(f"layer {source.digest} diff_id", str(diff_id), str(actual))
    order = None
    if prefetch is not None:
        order = await anyio.to_thread.run_sync(profile_first_order, tar_path, prefetch)
        if order.changed:
            ordered_path = scratch / "layer.ordered.tar"
            actual = await anyio.to_thread.run_sync(
                write_member_order,
                tar_path,
                order,
                ordered_path,
                _reporter(progress, "reorder", tar_path.stat().st_size),
            )
            tar_path.unlink()
            tar_path = ordered_path
    out_path = scratch / "layer.zst"
    chunked = await anyio.to_thread.run_sync(
        write_chunked_layer,
        tar_path,
        out_path,
        chunking,
        actual,
        _reporter(progress, "convert", tar_path.stat().st_size),
        prefetch,
    )
    return LocalizedLayer(chunked, out_path, order)


def _reporter(
    progress: PhaseProgress | None, phase: str, total: int
) -> Callable[[int], None] | None:
    if progress is None:
        return None
    return lambda done: progress(phase, done, total)
