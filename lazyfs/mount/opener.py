"""Open an image for mounting: manifest, config and TOCs, verified, and the merged tree.

Only metadata is fetched here (through mount/metadata.py, which falls back to the cache when
the registry is down): the manifest (and index), the config, and each layer's TOC by a range
read at the position its annotation gives. Each TOC is checked against the checksum annotation
of the manifest, whose digest the tag resolved to, before it is parsed.

Plain layers (``tar``, ``tar+gzip``, ``tar+zstd`` without a TOC) cannot be read lazily. Each is
downloaded once, verified against its digest, and converted on the node by the pipeline
``lazyfs convert`` uses (convert/localize.py) into a zstd:chunked blob with fs-verity digests,
kept among the cache's local blobs (cache/blobs.py); from then on it is served like any other
layer, and its chunks go into the same content-addressed cache.

The TOCs of one image are capped together (``LimitsConfig.max_image_toc_*``): the sizes the
position annotations declare are summed before any TOC is fetched; eStargz TOCs, whose sizes
no annotation gives, and every layer's entry count are added as they arrive (``_TocBudget``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from lazyfs.cache import keys
from lazyfs.cache.store import ChunkCache
from lazyfs.config import ChunkingConfig, LimitsConfig
from lazyfs.convert.localize import localize_layer
from lazyfs.errors import (
    IntegrityError,
    LazyfsError,
    ManifestError,
    RegistryUnreachableError,
    TocError,
    UnsupportedMediaTypeError,
)
from lazyfs.formats import estargz
from lazyfs.formats.bounded import zstd_exact
from lazyfs.formats.chunked.toc import (
    LEGACY_TOC_CHECKSUM_ANNOTATION,
    LEGACY_TOC_POSITION_ANNOTATION,
    TOC_CHECKSUM_ANNOTATION,
    TOC_POSITION_ANNOTATION,
    VERITY_ANNOTATION,
    Toc,
    TocEntry,
    check_entries,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import ChunkedLayer
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    Descriptor,
    ImageConfig,
    Manifest,
    layer_compression,
    parse_manifest_or_index,
)
from lazyfs.model.platform import Platform
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.mount import kepttocs
from lazyfs.mount.metadata import MetadataFetcher
from lazyfs.mount.resolver import LayerBlob
from lazyfs.mount.tree import Tree, build_trees
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.failover import Failover

log = logging.getLogger(__name__)

_DEFAULT_LIMITS = LimitsConfig()


@dataclass(frozen=True)
class OpenedImage:
    reference: Reference  # pinned to the manifest digest
    manifest: Manifest
    layers: tuple[LayerBlob, ...]
    tree: Tree
    offline: bool
    # Opened for a layer store (per_layer): each layer's own tree, and the config's diff_ids.
    layer_trees: tuple[Tree, ...] = ()
    diff_ids: tuple[Digest, ...] = ()
    # The TOCs this open parsed, to be kept for the next (mount/kepttocs.py) once the mount is
    # ready; emptied by whoever keeps them.
    unkept: list[tuple[str, Toc]] = field(default_factory=list, compare=False, repr=False)


async def open_image(
    client: RegistryClient,
    cache: ChunkCache,
    ref: Reference,
    platform: Platform,
    failover: Failover | None = None,
    *,
    per_layer: bool = False,
    reuse: Callable[[Reference], OpenedImage | None] | None = None,
    offline: bool = False,
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> OpenedImage:
    """Open ``ref``; ``per_layer`` also builds each layer's own tree (mount/layerstore.py).

    ``reuse`` may return an image already opened for the manifest digest the reference
    resolved to: its TOCs and tree are then not fetched, parsed and built again. ``offline``
    reads only the cache (``lazyfs pin``): the client is never used."""
    fetcher = MetadataFetcher(client, cache, failover or Failover())
    fetcher.offline = offline
    digest, data, media_type = await fetcher.root(ref)
    parsed = parse_manifest_or_index(data, media_type)
    if not isinstance(parsed, Manifest):
        chosen = parsed.select(platform)
        digest = chosen.digest
        parsed = parse_manifest_or_index(await fetcher.manifest(ref, digest), chosen.media_type)
        if not isinstance(parsed, Manifest):
            raise ManifestError(f"{ref}: nested index {digest} is not supported")
    pinned = ref.with_digest(digest)
    known = reuse(pinned) if reuse is not None else None
    if known is not None and (known.layer_trees or not per_layer):
        return known
    budget = _TocBudget.declared(pinned, parsed, limits)
    indexed = await _index_layers(fetcher, pinned, parsed, budget)
    tree, layer_trees = await anyio.to_thread.run_sync(  # one pass: the trees share work
        lambda: build_trees([toc.entries for toc, _ in indexed], per_layer=per_layer)
    )
    layers = tuple(blob for _, blob in indexed)
    unkept = fetcher.unkept_tocs
    if not per_layer:
        return OpenedImage(pinned, parsed, layers, tree, fetcher.offline, unkept=unkept)
    diff_ids = await _diff_ids(fetcher, pinned, parsed)
    return OpenedImage(pinned, parsed, layers, tree, fetcher.offline, layer_trees, diff_ids, unkept)


async def _diff_ids(
    fetcher: MetadataFetcher, ref: Reference, manifest: Manifest
) -> tuple[Digest, ...]:
    """The config's diff_ids, one per layer (a layer store's ``info`` shows them)."""
    config = await fetcher.blob(ref, manifest.config.digest, manifest.config.size)  # cached
    diff_ids = ImageConfig.parse(config).diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise ManifestError(
            f"{ref}: the config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers"
        )
    return diff_ids


class _TocBudget:
    """What the image's TOCs may take together (``LimitsConfig.max_image_toc_*``)."""

    def __init__(
        self, ref: Reference, limits: LimitsConfig, toc_bytes: int, compressed_bytes: int
    ) -> None:
        self._ref = ref
        self._limits = limits
        self._toc_bytes = 0
        self._entries = 0
        self.add_bytes(toc_bytes, compressed_bytes, "as the manifest declares them")

    @classmethod
    def declared(cls, ref: Reference, manifest: Manifest, limits: LimitsConfig) -> _TocBudget:
        """The sizes the position annotations declare, summed before any TOC is fetched."""
        total = compressed = 0
        for layer in manifest.layers:
            position = _toc_position(layer)
            if position and _toc_checksum(layer):
                section = parse_toc_position(
                    position, layer=str(layer.digest), blob_size=layer.size, limits=limits
                )
                total += section.uncompressed_length
                compressed += section.length
        return cls(ref, limits, total, compressed)

    def add_bytes(self, toc_bytes: int, compressed_bytes: int, how: str) -> None:
        self._toc_bytes += toc_bytes
        limits = self._limits
        if self._toc_bytes > limits.max_image_toc_bytes:
            raise TocError(
                f"image {self._ref}: its TOCs take {self._toc_bytes} bytes ({how}), more than "
                f"the limit of {limits.max_image_toc_bytes} for one image (max_image_toc_bytes)"
            )
        if compressed_bytes > limits.max_image_toc_compressed_bytes:
            raise TocError(
                f"image {self._ref}: its TOCs take {compressed_bytes} compressed bytes ({how}), "
                f"more than the limit of {limits.max_image_toc_compressed_bytes} for one image "
                "(max_image_toc_compressed_bytes)"
            )

    def add_entries(self, count: int) -> None:
        self._entries += count
        if self._entries > self._limits.max_image_toc_entries:
            raise TocError(
                f"image {self._ref}: its TOCs hold more than "
                f"{self._limits.max_image_toc_entries} entries, the limit for one image "
                "(max_image_toc_entries)"
            )


async def _index_layers(
    fetcher: MetadataFetcher, ref: Reference, manifest: Manifest, budget: _TocBudget
) -> list[tuple[Toc, LayerBlob]]:
    """Every layer's TOC, and the config (kept for offline remounts), fetched concurrently:
    on a long link each is a round trip, and they do not depend on each other."""
    results: list[tuple[Toc, LayerBlob] | None] = [None] * len(manifest.layers)

    async def index(position: int, layer: Descriptor) -> None:
        indexed = await _index_layer(fetcher, ref, layer, budget)
        budget.add_entries(len(indexed[0].entries))
        results[position] = indexed

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(fetcher.blob, ref, manifest.config.digest, manifest.config.size)
            for position, layer in enumerate(manifest.layers):
                tasks.start_soon(index, position, layer)
    except ExceptionGroup as group:  # report one clear error, as a sequential fetch would
        first = next((e for e in _leaves(group) if isinstance(e, LazyfsError)), None)
        if first is None:
            raise
        raise first from None
    return [result for result in results if result is not None]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def _index_layer(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor, budget: _TocBudget
) -> tuple[Toc, LayerBlob]:
    if _is_zstd_chunked(layer):
        return await _layer_toc(fetcher, ref, layer), _layer_blob(layer)
    if estargz.TOC_DIGEST_ANNOTATION in layer.annotations:
        entries = await _estargz_entries(fetcher, ref, layer, budget)
        return Toc(tuple(entries)), LayerBlob(layer.digest, layer.size, "gzip", "sha256")
    return await _localize_plain_layer(fetcher, ref, layer)


async def _estargz_entries(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor, budget: _TocBudget
) -> list[TocEntry]:
    """The eStargz TOC: footer, then the TOC member, checked against the annotation."""
    expected = layer.annotations[estargz.TOC_DIGEST_ANNOTATION]
    key = keys.estargz_toc_key(expected)
    cached = known = await fetcher.get(key)
    if cached is None:
        tail_size = estargz.tail_read_size(layer.size)
        tail = await fetcher.blob_range(ref, layer, ByteRange(layer.size - tail_size, layer.size))
        footer = estargz.parse_tail(tail)
        section = estargz.toc_section(layer.size, footer)
        toc_json = estargz.read_toc_member(await fetcher.blob_range(ref, layer, section))
        cached = b"%d\n" % footer.toc_offset + toc_json
    offset_line, _, toc_json = cached.partition(b"\n")
    budget.add_bytes(len(toc_json), 0, f"with eStargz layer {layer.digest}")
    actual = estargz.toc_digest(toc_json)
    if actual != expected:
        raise IntegrityError(f"eStargz TOC of layer {layer.digest}", expected, actual)
    if known is None:
        await fetcher.remember(key, cached)
    return await anyio.to_thread.run_sync(  # a worker thread, as for zstd:chunked TOCs
        lambda: estargz.toc_entries(toc_json, int(offset_line), layer=str(layer.digest))
    )


def _is_zstd_chunked(layer: Descriptor) -> bool:
    keys = (TOC_POSITION_ANNOTATION, LEGACY_TOC_POSITION_ANNOTATION)
    return any(key in layer.annotations for key in keys)


async def _localize_plain_layer(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor
) -> tuple[Toc, LayerBlob]:
    """Download a plain layer once, verify it, convert it locally; reuse that on remounts."""
    layer_compression(layer.media_type)  # UnsupportedMediaTypeError before anything is fetched
    key = keys.local_layer_key(layer.digest)
    known = await fetcher.get(key)
    if known is not None:
        local = Digest.parse(known.decode())
        if fetcher.cache.blobs.has(local):
            data = await fetcher.cached(keys.local_toc_key(local), str(local))
            toc = await anyio.to_thread.run_sync(Toc.parse, data)
            return toc, _local_blob(local, layer)
    if fetcher.offline:
        raise RegistryUnreachableError(
            f"layer {layer.digest} is not cached and the registry is down"
        )
    log.warning(
        "layer %s is a plain %s layer: fetching it whole (not lazy)", layer.digest, layer.media_type
    )
    chunked = await _convert_locally(fetcher, ref, layer)
    # Written here, never parsed: checked as a fetched TOC would be (a remount parses it).
    check_entries(chunked.toc.entries, layer=str(layer.digest), blob_size=chunked.size)
    await fetcher.remember(keys.local_toc_key(chunked.digest), chunked.toc.to_json())
    await fetcher.remember(key, str(chunked.digest).encode())
    return chunked.toc, _local_blob(chunked.digest, layer, fetched=True)


async def _convert_locally(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor
) -> ChunkedLayer:
    """Fetch the whole layer (verified), convert it, and keep the result among local blobs."""

    async def download(dest: Path) -> Path:
        await fetcher.failover.first(
            ref, lambda r: fetcher.client.download_blob(r, layer.digest, dest)
        )
        return dest

    blobs = fetcher.cache.blobs
    with blobs.staging() as scratch:
        localized = await localize_layer(layer, download, scratch, ChunkingConfig())
        blobs.adopt(localized.path, localized.layer.digest)
    return localized.layer


def _local_blob(local: Digest, source: Descriptor, fetched: bool = False) -> LayerBlob:
    """A locally converted plain layer; sizes and digests shown to users are the source's."""
    return LayerBlob(
        local,
        source.size,
        "zstd",
        "verity",
        lazy=False,
        source_digest=source.digest,
        fetched_whole_bytes=source.size if fetched else 0,
    )


def _toc_position(layer: Descriptor) -> str | None:
    annotations = layer.annotations
    return annotations.get(TOC_POSITION_ANNOTATION) or annotations.get(
        LEGACY_TOC_POSITION_ANNOTATION
    )


def _toc_checksum(layer: Descriptor) -> str | None:
    annotations = layer.annotations
    return annotations.get(TOC_CHECKSUM_ANNOTATION) or annotations.get(
        LEGACY_TOC_CHECKSUM_ANNOTATION
    )


async def _layer_toc(fetcher: MetadataFetcher, ref: Reference, layer: Descriptor) -> Toc:
    position = _toc_position(layer)
    checksum = _toc_checksum(layer)
    if not position or not checksum:
        raise UnsupportedMediaTypeError(
            f"layer {layer.digest} ({layer.media_type}) is not zstd:chunked; "
            "convert the image with `lazyfs convert` first"
        )
    section = parse_toc_position(position, layer=str(layer.digest), blob_size=layer.size)
    kept_key = keys.kept_toc_key(Digest.parse(checksum), section.offset)
    kept = await anyio.to_thread.run_sync(kepttocs.load, fetcher.cache, kept_key)
    if kept is not None:  # checked by an earlier open against this checksum and blob end
        return kept
    compressed = await fetcher.toc(ref, layer, section, Digest.parse(checksum))
    what = f"layer {layer.digest}: TOC"

    def parse() -> Toc:  # a worker thread: ~0.2 s a layer, and the loop serves FUSE meanwhile
        data = zstd_exact(compressed, section.uncompressed_length, what)
        return Toc.parse(data, layer=str(layer.digest), blob_size=section.offset)

    toc = await anyio.to_thread.run_sync(parse)
    fetcher.unkept_tocs.append((kept_key, toc))
    return toc


def _layer_blob(layer: Descriptor) -> LayerBlob:
    if layer.annotations.get(VERITY_ANNOTATION):
        return LayerBlob(layer.digest, layer.size, "zstd", "verity")
    return LayerBlob(layer.digest, layer.size, "zstd", "sha256")
