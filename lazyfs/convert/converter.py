"""``lazyfs convert``: rewrite an image's layers as zstd:chunked layers with fs-verity digests.

Order of work, so that a failure never leaves a manifest behind: every layer of every selected
platform is converted and its blob pushed first; then the config blobs; then the per-platform
manifests (by digest, untagged); and only at the very end the tagged root (manifest or index).
Docker manifests and lists become their OCI equivalents, as zstd layers need OCI media types.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.config import ChunkingConfig
from lazyfs.convert.localize import LocalizedLayer, localize_layer
from lazyfs.convert.stores import ImageStore
from lazyfs.errors import ManifestError
from lazyfs.formats.chunked.order import MemberOrder
from lazyfs.formats.chunked.writer import ChunkedLayer
from lazyfs.model import manifests
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, ImageConfig, Index, Manifest, parse_manifest_or_index
from lazyfs.model.platform import Platform
from lazyfs.model.profiles import AccessProfile


@dataclass(frozen=True)
class ConvertOptions:
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    platform: Platform | None = None  # None: every platform of an index
    work_dir: Path | None = None  # scratch space for decompressed layers
    # An access profile: its files first in each layer, their chunks ranked in the TOCs
    # (formats/chunked/order.py, lazyfs/mount/prefetch.py).
    prefetch: AccessProfile | None = None


class ConvertProgress:
    """Receives progress events; the CLI renders them. The default ignores them."""

    def layer_started(self, index: int, count: int, descriptor: Descriptor) -> None:
        pass

    def layer_bytes(self, phase: str, done_bytes: int, total_bytes: int) -> None:
        pass

    def layer_finished(self, summary: LayerSummary) -> None:
        pass


@dataclass(frozen=True)
class ProfileFirstSummary:
    """What the profile-first order did to one layer (formats/chunked/order.py)."""

    files: int  # files of the profile moved to the start of the layer
    members: int  # those and the directory entries and opaque markers moved with them
    tar_bytes: int  # the tar bytes they take: the start of the layer's tar
    kept_files: int  # files of the profile left in place (the tree would change otherwise)
    note: str  # why the layer kept its order, if it kept all of it

    @classmethod
    def of(cls, order: MemberOrder) -> ProfileFirstSummary:
        return cls(
            order.moved_files, order.moved_members, order.moved_bytes, order.kept_files, order.note
        )


@dataclass(frozen=True)
class LayerSummary:
    source_digest: str
    source_size_bytes: int
    digest: str
    size_bytes: int
    tar_size_bytes: int
    file_count: int
    chunk_count: int
    dedup_ratio: float
    diff_id: str = ""  # of the converted layer: the source's unless the order changed
    profile_first: ProfileFirstSummary | None = None  # converted with a profile

    @classmethod
    def of(cls, source: Descriptor, localized: LocalizedLayer) -> LayerSummary:
        layer = localized.layer
        order = localized.order
        return cls(
            source_digest=str(source.digest),
            source_size_bytes=source.size,
            digest=str(layer.digest),
            size_bytes=layer.size,
            tar_size_bytes=layer.stats.tar_bytes,
            file_count=layer.stats.file_count,
            chunk_count=layer.stats.chunk_count,
            dedup_ratio=round(layer.stats.dedup_ratio, 4),
            diff_id=str(layer.diff_id),
            profile_first=ProfileFirstSummary.of(order) if order is not None else None,
        )


@dataclass(frozen=True)
class ManifestSummary:
    platform: str | None
    digest: str
    layers: tuple[LayerSummary, ...]


@dataclass(frozen=True)
class ConvertSummary:
    digest: str
    media_type: str
    manifests: tuple[ManifestSummary, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "mediaType": self.media_type,
            "manifests": [
                {
                    "platform": m.platform,
                    "digest": m.digest,
                    "layers": [_layer_json(layer) for layer in m.layers],
                }
                for m in self.manifests
            ],
        }


def _layer_json(layer: LayerSummary) -> dict[str, Any]:
    result: dict[str, Any] = {
        "sourceDigest": layer.source_digest,
        "sourceSize": layer.source_size_bytes,
        "digest": layer.digest,
        "size": layer.size_bytes,
        "diffID": layer.diff_id,
        "tarSize": layer.tar_size_bytes,
        "files": layer.file_count,
        "chunks": layer.chunk_count,
        "dedupRatio": layer.dedup_ratio,
    }
    first = layer.profile_first
    if first is not None:
        result["profileFirst"] = {
            "files": first.files,
            "members": first.members,
            "tarBytes": first.tar_bytes,
            "keptFiles": first.kept_files,
            **({"note": first.note} if first.note else {}),
        }
    return result


@dataclass(frozen=True)
class _ConvertedManifest:
    data: bytes
    platform: Platform | None
    summary: ManifestSummary


class Converter:
    """Converts the image at one store into another store."""

    def __init__(
        self,
        source: ImageStore,
        dest: ImageStore,
        options: ConvertOptions,
        progress: ConvertProgress | None = None,
    ) -> None:
        self._source = source
        self._dest = dest
        self._options = options
        self._progress = progress or ConvertProgress()

    async def run(self) -> ConvertSummary:
        root = await self._source.get_root()
        parsed = parse_manifest_or_index(root.data, root.media_type)
        with tempfile.TemporaryDirectory(
            prefix="lazyfs-convert-", dir=self._options.work_dir
        ) as tmp:
            scratch = Path(tmp)
            if isinstance(parsed, Manifest):
                return await self._convert_single(parsed, None, scratch)
            if self._options.platform is not None:
                descriptor = parsed.select(self._options.platform)
                return await self._convert_single(
                    await self._child(descriptor), descriptor.platform, scratch
                )
            return await self._convert_index(parsed, scratch)

    async def _child(self, descriptor: Descriptor) -> Manifest:
        parsed = parse_manifest_or_index(
            await self._source.get_manifest(descriptor), descriptor.media_type
        )
        if not isinstance(parsed, Manifest):
            raise ManifestError(f"nested index {descriptor.digest} is not supported")
        return parsed

    async def _convert_single(
        self, manifest: Manifest, platform: Platform | None, scratch: Path
    ) -> ConvertSummary:
        converted = await self._convert_manifest(manifest, platform, scratch)
        digest = await self._dest.put_root(converted.data, manifests.OCI_MANIFEST)
        summary = ManifestSummary(converted.summary.platform, str(digest), converted.summary.layers)
        return ConvertSummary(str(digest), manifests.OCI_MANIFEST, (summary,))

    async def _convert_index(self, index: Index, scratch: Path) -> ConvertSummary:
        entries = index.platform_manifests()
        if not entries:
            raise ManifestError("the index lists no platform manifests")
        converted = [
            await self._convert_manifest(await self._child(d), d.platform, scratch) for d in entries
        ]
        descriptors = []
        for entry, result in zip(entries, converted, strict=True):
            digest = await self._dest.put_manifest(result.data, manifests.OCI_MANIFEST)
            descriptors.append(
                Descriptor(
                    media_type=manifests.OCI_MANIFEST,
                    digest=digest,
                    size=len(result.data),
                    platform=entry.platform,
                )
            )
        new_index = Index(
            media_type=manifests.OCI_INDEX,
            manifests=tuple(descriptors),
            annotations=index.annotations,
        )
        data = new_index.to_bytes()
        root = await self._dest.put_root(data, manifests.OCI_INDEX)
        return ConvertSummary(str(root), manifests.OCI_INDEX, tuple(r.summary for r in converted))

    async def _convert_manifest(
        self, manifest: Manifest, platform: Platform | None, scratch: Path
    ) -> _ConvertedManifest:
        config_data = await self._source.get_blob(manifest.config)
        diff_ids = ImageConfig.parse(config_data).diff_ids
        if len(diff_ids) != len(manifest.layers):
            raise ManifestError(
                f"config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers"
            )
        layers: list[Descriptor] = []
        summaries: list[LayerSummary] = []
        converted_layers: list[ChunkedLayer] = []
        for position, source_layer in enumerate(manifest.layers):
            self._progress.layer_started(position, len(manifest.layers), source_layer)
            localized = await self._convert_layer(source_layer, diff_ids[position], scratch)
            converted_layers.append(localized.layer)
            layers.append(_chunked_descriptor(localized.layer))
            summaries.append(LayerSummary.of(source_layer, localized))
            self._progress.layer_finished(summaries[-1])
        new_diff_ids = tuple(chunked.diff_id for chunked in converted_layers)
        config = await self._push_config(config_data, new_diff_ids, scratch)
        # Docker manifests become OCI ones: zstd layers need OCI media types. ``subject`` and
        # other extras are dropped: they describe the source image, not this one.
        new_manifest = Manifest(
            media_type=manifests.OCI_MANIFEST,
            config=config,
            layers=tuple(layers),
            annotations=manifest.annotations,
        )
        data = new_manifest.to_bytes()
        summary = ManifestSummary(
            str(platform) if platform else None, str(Digest.of(data)), tuple(summaries)
        )
        return _ConvertedManifest(data, platform, summary)

    async def _convert_layer(
        self, source_layer: Descriptor, diff_id: Digest, scratch: Path
    ) -> LocalizedLayer:
        localized = await localize_layer(
            source_layer,
            lambda path: self._source.open_blob(source_layer, path, None),
            scratch,
            self._options.chunking,
            diff_id=diff_id,
            prefetch=self._options.prefetch,
            progress=self._progress.layer_bytes,
        )
        await self._dest.put_blob(_chunked_descriptor(localized.layer), localized.path)
        return localized

    async def _push_config(
        self, data: bytes, diff_ids: tuple[Digest, ...], scratch: Path
    ) -> Descriptor:
        """Push the config with ``rootfs.diff_ids`` set to the converted layers' diff_ids.

        The tar streams pass through unchanged, so the diff_ids stay the same, and then the
        config bytes (and digest) are kept exactly as they were; only a profile-first order
        (``--prefetch``) changes a layer's tar, and with it its diff_id and the config.
        """
        parsed = ImageConfig.parse(data)
        if parsed.diff_ids != diff_ids:
            data = parsed.with_diff_ids(diff_ids).to_bytes()
        config = Descriptor(media_type=manifests.OCI_CONFIG, digest=Digest.of(data), size=len(data))
        path = scratch / "config.json"
        path.write_bytes(data)
        await self._dest.put_blob(config, path)
        return config


def _chunked_descriptor(layer: ChunkedLayer) -> Descriptor:
    return Descriptor(
        media_type=manifests.OCI_LAYER_TAR_ZSTD,
        digest=layer.digest,
        size=layer.size,
        annotations=layer.annotations,
    )
