"""Open an image for mounting: manifest, config and TOCs, verified, and the merged tree.

Only metadata is fetched here: the manifest (and index), the config, and each layer's TOC by a
range read at the position its annotation gives. Each TOC is checked against the checksum
annotation of the manifest, whose digest the tag resolved to, before it is parsed.

Everything fetched is also kept in the cache's metadata store, keyed by digest, so that a
remount works with the registry down: when the registry cannot be reached, the tag is resolved
from the last digest seen and every blob is read from the cache.

Plain layers (``tar``, ``tar+gzip``, ``tar+zstd`` without a TOC) cannot be read lazily. Each is
downloaded once, verified against its digest, and converted locally into a zstd:chunked blob
with fs-verity digests, kept under ``CACHE_DIR/layers/``; from then on it is served like any
other layer, from that local blob, and its chunks go into the same content-addressed cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import zstandard

from lazyfs.cache.store import ChunkCache
from lazyfs.config import ChunkingConfig
from lazyfs.errors import (
    IntegrityError,
    LazyfsError,
    ManifestError,
    RegistryError,
    RegistryUnreachableError,
    TocError,
    TransientRegistryError,
    UnsupportedMediaTypeError,
)
from lazyfs.formats import estargz
from lazyfs.formats.chunked.toc import (
    LEGACY_TOC_CHECKSUM_ANNOTATION,
    LEGACY_TOC_POSITION_ANNOTATION,
    TOC_CHECKSUM_ANNOTATION,
    TOC_POSITION_ANNOTATION,
    VERITY_ANNOTATION,
    BlobSection,
    Toc,
    TocEntry,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import ChunkedLayer, write_chunked_layer
from lazyfs.formats.plain import Compression, decompress_layer
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, Manifest, layer_compression, parse_manifest_or_index
from lazyfs.model.platform import Platform
from lazyfs.model.ranges import ByteRange
from lazyfs.model.reference import Reference
from lazyfs.mount.resolver import LayerBlob
from lazyfs.mount.tree import Tree, build_tree
from lazyfs.registry.client import RegistryClient
from lazyfs.registry.mirrors import EndpointOrder

log = logging.getLogger(__name__)
T = TypeVar("T")

_OFFLINE_ERRORS = (RegistryUnreachableError, TransientRegistryError)


LOCAL_LAYERS_DIR = "layers"


@dataclass(frozen=True)
class OpenedImage:
    reference: Reference  # pinned to the manifest digest
    manifest: Manifest
    layers: tuple[LayerBlob, ...]
    tree: Tree
    offline: bool


class MetadataFetcher:
    """Fetches metadata from the registry, falling back to the cache when it is unreachable.

    Each request goes to the endpoints in order (mirrors first, then the origin) until one
    answers.
    """

    def __init__(self, client: RegistryClient, cache: ChunkCache, endpoints: EndpointOrder) -> None:
        self._client = client
        self._cache = cache
        self._endpoints = endpoints
        self.offline = False

    async def _first(self, ref: Reference, call: Callable[[Reference], Awaitable[T]]) -> T:
        candidates = self._endpoints(ref)
        for index, endpoint in enumerate(candidates):
            try:
                return await call(endpoint)
            except RegistryError as exc:
                if index == len(candidates) - 1:
                    raise
                self._endpoints.failed(endpoint)
                log.warning("%s failed (%s); trying the next endpoint", endpoint.registry, exc)
        raise AssertionError("no endpoints")

    async def root(self, ref: Reference) -> tuple[Digest, bytes, str | None]:
        tag_key = f"tag:{ref}"
        if not self.offline:
            try:
                fetched = await self._first(ref, self._client.get_manifest)
            except _OFFLINE_ERRORS as exc:
                log.warning("registry unreachable (%s); trying the cache", exc)
                self.offline = True
            else:
                await self._remember(f"blob:{fetched.digest}", fetched.data)
                await self._remember(tag_key, str(fetched.digest).encode())
                return fetched.digest, fetched.data, fetched.media_type
        digest = Digest.parse((await self._cached(tag_key, f"{ref} (registry down)")).decode())
        return digest, await self._cached(f"blob:{digest}", str(digest)), None

    async def manifest(self, ref: Reference, digest: Digest) -> bytes:
        key = f"blob:{digest}"
        if not self.offline:
            cached = await anyio.to_thread.run_sync(self._cache.get_meta, key)
            if cached is not None:
                return cached
            fetched = await self._first(ref.with_digest(digest), self._client.get_manifest)
            await self._remember(key, fetched.data)
            return fetched.data
        return await self._cached(key, str(digest))

    async def blob(self, ref: Reference, digest: Digest) -> bytes:
        key = f"blob:{digest}"
        cached = await anyio.to_thread.run_sync(self._cache.get_meta, key)
        if cached is not None:
            digest.verify(cached, f"cached blob {digest}")
            return cached
        if self.offline:
            raise RegistryUnreachableError(f"blob {digest} is not cached and the registry is down")
        data = await self._first(ref, lambda r: self._client.get_blob(r, digest))
        await self._remember(key, data)
        return data

    async def toc(
        self, ref: Reference, layer: Descriptor, section: BlobSection, checksum: Digest
    ) -> bytes:
        """The compressed TOC, checked against the manifest's checksum annotation."""
        key = f"blob:{checksum}"
        data = await anyio.to_thread.run_sync(self._cache.get_meta, key)
        if data is None:
            if self.offline:
                raise RegistryUnreachableError(
                    f"TOC of {layer.digest} is not cached and the registry is down"
                )
            data = await self._client.get_blob_range(
                ref, layer.digest, ByteRange(section.offset, section.end)
            )
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != str(checksum):
            raise IntegrityError(f"TOC of layer {layer.digest}", str(checksum), actual)
        await self._remember(key, data)
        return data

    @property
    def cache(self) -> ChunkCache:
        return self._cache

    async def cached_blob(self, key: str) -> bytes:
        return await self._cached(key, key)

    async def remember(self, key: str, data: bytes) -> None:
        await anyio.to_thread.run_sync(self._cache.put_meta, key, data)

    async def convert_locally(
        self, ref: Reference, layer: Descriptor, compression: Compression, local_dir: Path
    ) -> ChunkedLayer:
        """Fetch a whole layer (verified), then write it as a local zstd:chunked blob."""
        staging = local_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging) as tmp:
            blob, tar, out = Path(tmp, "blob"), Path(tmp, "layer.tar"), Path(tmp, "layer.zst")
            await self._first(ref, lambda r: self._client.download_blob(r, layer.digest, blob))
            diff_id = await anyio.to_thread.run_sync(
                decompress_layer, blob, compression, layer.digest, tar
            )
            chunked = await anyio.to_thread.run_sync(
                write_chunked_layer, tar, out, ChunkingConfig(), diff_id
            )
            final = local_dir / chunked.digest.algorithm / chunked.digest.hex
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, final)  # atomic: a half-written blob never has the final name
        return chunked

    async def blob_range(self, ref: Reference, layer: Descriptor, rng: ByteRange) -> bytes:
        if self.offline:
            raise RegistryUnreachableError(f"layer {layer.digest} metadata is not cached")
        return await self._first(ref, lambda r: self._client.get_blob_range(r, layer.digest, rng))

    async def _remember(self, key: str, data: bytes) -> None:
        await self.remember(key, data)

    async def _cached(self, key: str, what: str) -> bytes:
        data = await anyio.to_thread.run_sync(self._cache.get_meta, key)
        if data is None:
            raise RegistryUnreachableError(f"the registry is unreachable and {what} is not cached")
        return data


async def open_image(
    client: RegistryClient,
    cache: ChunkCache,
    ref: Reference,
    platform: Platform,
    endpoints: EndpointOrder | None = None,
) -> OpenedImage:
    fetcher = MetadataFetcher(client, cache, endpoints or EndpointOrder())
    digest, data, media_type = await fetcher.root(ref)
    parsed = parse_manifest_or_index(data, media_type)
    if not isinstance(parsed, Manifest):
        chosen = parsed.select(platform)
        digest = chosen.digest
        parsed = parse_manifest_or_index(await fetcher.manifest(ref, digest), chosen.media_type)
        if not isinstance(parsed, Manifest):
            raise ManifestError(f"{ref}: nested index {digest} is not supported")
    pinned = ref.with_digest(digest)
    indexed = await _index_layers(fetcher, pinned, parsed, cache)
    tree = await anyio.to_thread.run_sync(build_tree, [toc.entries for toc, _ in indexed])
    layers = tuple(blob for _, blob in indexed)
    return OpenedImage(pinned, parsed, layers, tree, fetcher.offline)


async def _index_layers(
    fetcher: MetadataFetcher, ref: Reference, manifest: Manifest, cache: ChunkCache
) -> list[tuple[Toc, LayerBlob]]:
    """Every layer's TOC, and the config (kept for offline remounts), fetched concurrently:
    on a long link each is a round trip, and they do not depend on each other."""
    results: list[tuple[Toc, LayerBlob] | None] = [None] * len(manifest.layers)

    async def index(position: int, layer: Descriptor) -> None:
        results[position] = await _index_layer(fetcher, ref, layer, cache)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(fetcher.blob, ref, manifest.config.digest)
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
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor, cache: ChunkCache
) -> tuple[Toc, LayerBlob]:
    if _is_zstd_chunked(layer):
        return await _layer_toc(fetcher, ref, layer), _layer_blob(layer)
    if estargz.TOC_DIGEST_ANNOTATION in layer.annotations:
        entries = await _estargz_entries(fetcher, ref, layer)
        return Toc(tuple(entries)), LayerBlob(layer.digest, layer.size, "gzip", "sha256")
    return await _localize_plain_layer(fetcher, ref, layer, cache.directory / LOCAL_LAYERS_DIR)


async def _estargz_entries(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor
) -> list[TocEntry]:
    """The eStargz TOC: footer, then the TOC member, checked against the annotation."""
    expected = layer.annotations[estargz.TOC_DIGEST_ANNOTATION]
    key = f"estargz-toc:{expected}"
    cached = await anyio.to_thread.run_sync(fetcher.cache.get_meta, key)
    if cached is None:
        tail_size = estargz.tail_read_size(layer.size)
        tail = await fetcher.blob_range(ref, layer, ByteRange(layer.size - tail_size, layer.size))
        footer = estargz.parse_tail(tail)
        section = estargz.toc_section(layer.size, footer)
        toc_json = estargz.read_toc_member(await fetcher.blob_range(ref, layer, section))
        cached = b"%d\n" % footer.toc_offset + toc_json
    offset_line, _, toc_json = cached.partition(b"\n")
    actual = estargz.toc_digest(toc_json)
    if actual != expected:
        raise IntegrityError(f"eStargz TOC of layer {layer.digest}", expected, actual)
    await fetcher.remember(key, cached)
    return estargz.toc_entries(toc_json, int(offset_line))


def _is_zstd_chunked(layer: Descriptor) -> bool:
    keys = (TOC_POSITION_ANNOTATION, LEGACY_TOC_POSITION_ANNOTATION)
    return any(key in layer.annotations for key in keys)


async def _localize_plain_layer(
    fetcher: MetadataFetcher, ref: Reference, layer: Descriptor, local_dir: Path
) -> tuple[Toc, LayerBlob]:
    """Download a plain layer once, verify it, convert it locally; reuse that on remounts."""
    compression = layer_compression(layer.media_type)  # UnsupportedMediaTypeError if unknown
    key = f"local-layer:{layer.digest}"
    known = await anyio.to_thread.run_sync(fetcher.cache.get_meta, key)
    if known is not None:
        local = Digest.parse(known.decode())
        if (local_dir / local.algorithm / local.hex).is_file():
            toc = Toc.parse(await fetcher.cached_blob(f"local-toc:{local}"))
            return toc, _local_blob(local, layer)
    if fetcher.offline:
        raise RegistryUnreachableError(
            f"layer {layer.digest} is not cached and the registry is down"
        )
    log.warning(
        "layer %s is a plain %s layer: fetching it whole (not lazy)", layer.digest, layer.media_type
    )
    chunked = await fetcher.convert_locally(ref, layer, compression, local_dir)
    await fetcher.remember(f"local-toc:{chunked.digest}", chunked.toc.to_json())
    await fetcher.remember(key, str(chunked.digest).encode())
    return chunked.toc, _local_blob(chunked.digest, layer, fetched=True)


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


async def _layer_toc(fetcher: MetadataFetcher, ref: Reference, layer: Descriptor) -> Toc:
    annotations = layer.annotations
    position = annotations.get(TOC_POSITION_ANNOTATION) or annotations.get(
        LEGACY_TOC_POSITION_ANNOTATION
    )
    checksum = annotations.get(TOC_CHECKSUM_ANNOTATION) or annotations.get(
        LEGACY_TOC_CHECKSUM_ANNOTATION
    )
    if not position or not checksum:
        raise UnsupportedMediaTypeError(
            f"layer {layer.digest} ({layer.media_type}) is not zstd:chunked; "
            "convert the image with `lazyfs convert` first"
        )
    section = parse_toc_position(position)
    compressed = await fetcher.toc(ref, layer, section, Digest.parse(checksum))
    return Toc.parse(_decompress_toc(compressed, section.uncompressed_length))


def _decompress_toc(compressed: bytes, uncompressed_length: int) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(
            compressed, max_output_size=uncompressed_length
        )
    except zstandard.ZstdError as exc:
        raise TocError(f"TOC does not decompress: {exc}") from exc
    if len(data) != uncompressed_length:
        raise TocError(f"TOC is {len(data)} bytes, the annotation says {uncompressed_length}")
    return data


def _layer_blob(layer: Descriptor) -> LayerBlob:
    if layer.annotations.get(VERITY_ANNOTATION):
        return LayerBlob(layer.digest, layer.size, "zstd", "verity")
    return LayerBlob(layer.digest, layer.size, "zstd", "sha256")


def layer_sizes(layers: Sequence[LayerBlob]) -> list[int]:
    return [layer.size for layer in layers]
