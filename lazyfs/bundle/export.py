"""``lazyfs bundle export``: an image's metadata and the chunks a node lacks, as a bundle.

Each image is opened as a mount opens it (manifest, config and TOCs, verified and cached); the
chunks of its merged tree that the local cache lacks are fetched through a resolver, verified
like any read; then the metadata and the chunks the target does not have (``--have``) are
written in profile order (the TOC's ranks first, then layer order), packed into zstd frames.
Nothing reaches the output path until the bundle is complete (built beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import zstandard

from lazyfs.bundle import tocdelta
from lazyfs.bundle.format import (
    BUNDLE_ARTIFACT_TYPE,
    CONTENTS_MEDIA_TYPE,
    PACK_TARGET_BYTES,
    BundleChunk,
    BundleContents,
    BundleImage,
)
from lazyfs.bundle.inventory import Inventory
from lazyfs.bundle.tocdelta import TocDelta
from lazyfs.cache import keys
from lazyfs.cache.store import ChunkCache
from lazyfs.config import ResolverConfig
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import BundleError, CacheError
from lazyfs.formats import estargz
from lazyfs.formats.chunked.toc import LEGACY_TOC_CHECKSUM_ANNOTATION, TOC_CHECKSUM_ANNOTATION
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_EMPTY, OCI_MANIFEST, Descriptor, Manifest
from lazyfs.model.platform import Platform
from lazyfs.model.reference import Reference
from lazyfs.mount.image import ImageOptions, MountedImage, PrefetchOptions
from lazyfs.mount.imagechunks import chunk_keys, stored_chunks
from lazyfs.mount.resolver import SharedChunks
from lazyfs.mount.tree import LayerChunk, Node
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    images: int = 0
    metadata_entries: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    skipped_chunks: int = 0  # the target has them (--have)
    bundle_bytes: int = 0
    fetched_bytes: int = 0  # fetched from the registry to complete the local cache
    toc_deltas: int = 0  # TOCs sent as a delta against one the target holds (tocdelta.py)
    toc_bytes: int = 0  # those TOCs' own size
    toc_delta_bytes: int = 0  # what their deltas took instead


@dataclass
class _Collected:
    images: list[BundleImage] = field(default_factory=list)
    metadata: dict[str, bytes] = field(default_factory=dict)
    chunks: list[str] = field(default_factory=list)  # fs-verity digests, in order, once each
    tocs: set[str] = field(default_factory=set)  # the zstd:chunked TOCs among the metadata


async def export_bundle(
    refs: Sequence[Reference],
    output: Path,
    cache: ChunkCache,
    client: RegistryClient,
    platform: Platform,
    have: frozenset[str] = frozenset(),
    step: Callable[[str], None] = lambda _: None,
    held: Inventory | None = None,
) -> ExportSummary:
    """``held``: the target's whole inventory; with its blobs, TOCs may go as deltas."""
    collected, summary = _Collected(), ExportSummary()
    async with anyio.create_task_group() as tasks:
        shared = SharedChunks(cache, ResolverConfig(), tasks)
        for ref in refs:
            step(f"opening {ref}")
            options = ImageOptions(ref, platform, prefetch=PrefetchOptions(enabled=False))
            image = await MountedImage.open(client, shared, Failover(), options)
            step(f"completing the local cache for {ref}")
            order = await _collect(image, ref, cache, collected)
            await image.resolver.prefetch(order)
            summary.fetched_bytes += image.resolver.stats.bytes_fetched
            found = await anyio.to_thread.run_sync(_chunk_keys, image, cache, order)
            collected.chunks.extend(found)
        tasks.cancel_scope.cancel()
    step(f"writing {output}")
    await anyio.to_thread.run_sync(_write, collected, output, cache, have, summary, held)
    summary.images = len(refs)
    return summary


async def _collect(
    image: MountedImage, ref: Reference, cache: ChunkCache, collected: _Collected
) -> list[tuple[Node, LayerChunk]]:
    opened = image.opened
    root_text = await anyio.to_thread.run_sync(cache.get_meta, keys.tag_key(ref))
    if root_text is None:
        raise BundleError(f"{ref}: its tag is not in the cache")
    root = Digest.parse(root_text.decode())
    collected.images.append(BundleImage(str(ref), root))
    wanted = [keys.blob_key(root), keys.blob_key(opened.reference.digest or root)]
    wanted.append(keys.blob_key(opened.manifest.config.digest))
    layer_keys = _layer_keys(ref, opened.manifest)
    wanted.extend(layer_keys)
    collected.tocs.update(key for key in layer_keys if key.startswith("blob:"))
    for key in wanted:
        value = await anyio.to_thread.run_sync(cache.get_meta, key)
        if value is None:
            raise BundleError(f"{ref}: {key} is not in the cache")
        collected.metadata[key] = value
    return await anyio.to_thread.run_sync(stored_chunks, opened.tree)


def _layer_keys(ref: Reference, manifest: Manifest) -> list[str]:
    found = []
    for layer in manifest.layers:
        annotations = layer.annotations
        checksum = annotations.get(TOC_CHECKSUM_ANNOTATION) or annotations.get(
            LEGACY_TOC_CHECKSUM_ANNOTATION
        )
        if checksum:
            found.append(keys.blob_key(checksum))
        elif estargz.TOC_DIGEST_ANNOTATION in annotations:
            found.append(keys.estargz_toc_key(annotations[estargz.TOC_DIGEST_ANNOTATION]))
        else:
            raise BundleError(
                f"{ref}: layer {layer.digest} is a plain layer; bundles carry lazy layers "
                "(zstd:chunked, eStargz): convert the image first"
            )
    return found


def _chunk_keys(
    image: MountedImage, cache: ChunkCache, order: list[tuple[Node, LayerChunk]]
) -> list[str]:
    """Worker thread: the fs-verity digest each chunk is cached under."""
    found = []
    for (_node, chunk), verity in zip(order, chunk_keys(image.opened, cache, order), strict=True):
        if verity is None:
            raise BundleError(f"chunk {chunk.ref.sha256} of {image.opened.reference} is not cached")
        found.append(verity)
    return found


def _write(
    collected: _Collected,
    output: Path,
    cache: ChunkCache,
    have: frozenset[str],
    summary: ExportSummary,
    held: Inventory | None = None,
) -> None:
    with _staged(output) as layout_dir:
        layout = OciLayout.create(layout_dir)
        deltas = _toc_deltas(layout, collected, cache, held, summary)
        delta_keys = {delta.key for delta in deltas}
        metadata = tuple(
            (key, layout.add_blob_bytes(value))
            for key, value in collected.metadata.items()
            if key not in delta_keys
        )
        summary.metadata_entries = len(metadata) + len(deltas)
        packs, chunks = _write_packs(layout, collected.chunks, cache, have, summary)
        contents = BundleContents(tuple(collected.images), metadata, packs, chunks, deltas)
        data = contents.to_json()
        layer = Descriptor(CONTENTS_MEDIA_TYPE, layout.add_blob_bytes(data), len(data))
        config = Descriptor(OCI_EMPTY, layout.add_blob_bytes(b"{}"), 2)
        manifest = Manifest(
            OCI_MANIFEST, config, (layer,), {}, {"artifactType": BUNDLE_ARTIFACT_TYPE}
        ).to_bytes()
        descriptor = Descriptor(OCI_MANIFEST, layout.add_blob_bytes(manifest), len(manifest))
        layout.tag(descriptor.with_annotations({}), "lazyfs-bundle")
    summary.bundle_bytes = _size(output)


def _toc_deltas(
    layout: OciLayout,
    collected: _Collected,
    cache: ChunkCache,
    held: Inventory | None,
    summary: ExportSummary,
) -> tuple[TocDelta, ...]:
    """Worker thread: the TOCs that can go as deltas against one the target holds."""
    if held is None or not held.blobs or held.zstd != tocdelta.zstd_library():
        return ()  # another zstd may recompress differently: the TOC would not come back
    bases = _base_tocs(held.blobs, cache)
    deltas = []
    for key in sorted(collected.tocs):
        value = collected.metadata[key]
        target = tocdelta.toc_json(value, f"TOC {key}")
        base = tocdelta.pick_base(target, bases)
        encoded = None if base is None else tocdelta.encode(value, target, bases[base])
        if base is None or encoded is None or len(encoded[0]) >= len(value):
            continue
        data, level = encoded
        deltas.append(TocDelta(key, base, layout.add_blob_bytes(data), len(target), level))
        summary.toc_deltas += 1
        summary.toc_bytes += len(value)
        summary.toc_delta_bytes += len(data)
    return tuple(deltas)


def _base_tocs(blobs: frozenset[str], cache: ChunkCache) -> dict[str, bytes]:
    """The TOCs (key: JSON) both the target and this node hold; other blobs are JSON."""
    found = {}
    for key in sorted(blobs):
        value = cache.get_meta(key)
        if value is not None and tocdelta.is_zstd(value):
            try:
                found[key] = tocdelta.toc_json(value, f"TOC {key}")
            except BundleError:
                continue  # not a TOC after all: no base
    return found


def _write_packs(
    layout: OciLayout,
    verities: list[str],
    cache: ChunkCache,
    have: frozenset[str],
    summary: ExportSummary,
) -> tuple[tuple[Digest, ...], tuple[BundleChunk, ...]]:
    packs: list[Digest] = []
    chunks: list[BundleChunk] = []
    pending: list[bytes] = []
    size = 0
    seen: set[str] = set()
    for verity in verities:
        if verity in seen:
            continue
        seen.add(verity)
        if verity in have:
            summary.skipped_chunks += 1
            continue
        data = cache.get_chunk(verity)
        if data is None:
            raise CacheError(f"chunk {verity} left the cache while the bundle was written")
        chunks.append(BundleChunk(verity, len(packs), size, len(data)))
        pending.append(data)
        size += len(data)
        summary.chunks += 1
        summary.chunk_bytes += len(data)
        if size >= PACK_TARGET_BYTES:
            packs.append(_pack(layout, pending))
            pending, size = [], 0
    if pending:
        packs.append(_pack(layout, pending))
    return tuple(packs), tuple(chunks)


def _pack(layout: OciLayout, pending: list[bytes]) -> Digest:
    data = b"".join(pending)
    return layout.add_blob_bytes(zstandard.ZstdCompressor(level=3).compress(data))


@contextlib.contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A layout directory beside ``output``; on success it becomes ``output`` (or its tar)."""
    parent = output.absolute().parent
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".lazyfs-bundle-", dir=parent))
    except OSError as exc:
        raise BundleError(f"cannot write a bundle in {parent}: {exc.strerror}") from exc
    try:
        layout_dir = scratch / "layout"
        yield layout_dir
        if output.name.endswith(".tar"):
            with tarfile.open(scratch / "bundle.tar", "w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(layout_dir.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(layout_dir)), recursive=False)
            (scratch / "bundle.tar").replace(output)
        else:
            if output.exists():
                raise BundleError(f"{output} exists: remove it, or name a new directory")
            layout_dir.replace(output)
    except OSError as exc:
        raise BundleError(f"cannot write the bundle {output}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
