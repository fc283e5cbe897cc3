"""``lazyfs bundle import``: admit a bundle's metadata and chunks, all of it verified first.

Two passes. The first checks everything and admits nothing: every blob against its sha256
(OciLayout.read_blob), every metadata value (a TOC sent as a delta once rebuilt: tocdelta.py)
against the digest its key names (a manifest,
config or TOC by its own digest; an eStargz TOC by the digest its annotation gives), the
chain of each image (its manifest, config and every layer's TOC are in the bundle), and every
chunk against its fs-verity digest, each pack decompressed no further than its chunks' lengths.
Only then does the second pass write, checking each chunk again as it goes (a bundle on a disk
someone else can write may change between the passes). Tags are written last, so a mount never
finds a tag whose image is incomplete.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lazyfs.bundle import tocdelta
from lazyfs.bundle.format import (
    BUNDLE_ARTIFACT_TYPE,
    CONTENTS_MEDIA_TYPE,
    MAX_CONTENTS_BYTES,
    BundleChunk,
    BundleContents,
)
from lazyfs.cache import keys
from lazyfs.cache.store import ChunkCache
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import BundleError, LazyfsError
from lazyfs.formats import estargz
from lazyfs.formats.bounded import zstd_exact
from lazyfs.formats.chunked.toc import LEGACY_TOC_CHECKSUM_ANNOTATION, TOC_CHECKSUM_ANNOTATION
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import MAX_MANIFEST_BYTES, Index, Manifest, parse_manifest_or_index
from lazyfs.model.reference import Reference
from lazyfs.model.verity import format_verity, fsverity_digest

log = logging.getLogger(__name__)

_WRITE_BATCH = 256


@dataclass
class ImportSummary:
    images: list[str]
    metadata_entries: int
    chunks: int
    chunk_bytes: int


def import_bundle(path: Path, cache: ChunkCache, staging: Path) -> ImportSummary:
    """Worker thread (or a plain process): verify the bundle at ``path``, then admit it."""
    with _opened(path, staging) as layout:
        contents = _contents(layout)
        metadata = {key: layout.read_blob(blob) for key, blob in contents.metadata}
        metadata.update(_rebuilt_tocs(layout, contents, cache, set(metadata)))
        for key, value in metadata.items():
            _check_metadata(key, value)
        tags = {_tag_key(image.reference): image.root for image in contents.images}
        for image in contents.images:
            _check_chain(image.reference, image.root, metadata)
        checked = sum(1 for _ in _verified_chunks(layout, contents))  # pass 1: nothing kept
        log.info("bundle %s verified: %d chunks", path, checked)
        admitted = _admit_chunks(layout, contents, cache)  # pass 2
        for key, value in metadata.items():
            cache.put_meta(key, value)
        for key, root in tags.items():
            cache.put_meta(key, str(root).encode())
    return ImportSummary(
        [image.reference for image in contents.images],
        len(metadata),
        len(contents.chunks),
        admitted,
    )


@contextlib.contextmanager
def _opened(path: Path, staging: Path) -> Iterator[OciLayout]:
    if path.is_dir():
        yield OciLayout(path)
        return
    if not tarfile.is_tarfile(path):
        raise BundleError(f"{path} is neither a bundle directory nor a tar of one")
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging) as scratch:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(scratch, filter="data")  # no links out, no devices, no ..
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"cannot unpack the bundle {path}: {exc}") from exc
        yield OciLayout(Path(scratch))


def _contents(layout: OciLayout) -> BundleContents:
    entries = [
        d for d in layout.index().manifests if d.extra.get("artifactType") == BUNDLE_ARTIFACT_TYPE
    ] or [d for d in layout.index().manifests if d.ref_name == "lazyfs-bundle"]
    if len(entries) != 1:
        raise BundleError(f"{layout.path}: not a lazyfs bundle (no single bundle manifest)")
    # Whoever wrote the bundle controls its files: its manifest is capped as a registry's is.
    size = layout.blob_size(entries[0].digest)
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{layout.path}: the bundle manifest is {size} bytes, "
            f"more than the {MAX_MANIFEST_BYTES} a manifest may have"
        )
    data = layout.read_blob(entries[0].digest, MAX_MANIFEST_BYTES)  # capped if it grows meanwhile
    manifest = Manifest.parse(data, entries[0].media_type)
    if manifest.extra.get("artifactType") != BUNDLE_ARTIFACT_TYPE or len(manifest.layers) != 1:
        raise BundleError(f"{layout.path}: the bundle manifest is not a lazyfs bundle's")
    layer = manifest.layers[0]
    if layer.media_type != CONTENTS_MEDIA_TYPE or layer.size > MAX_CONTENTS_BYTES:
        raise BundleError(f"{layout.path}: the bundle's contents are not a lazyfs bundle's")
    return BundleContents.parse(layout.read_blob(layer.digest))


def _rebuilt_tocs(
    layout: OciLayout, contents: BundleContents, cache: ChunkCache, carried: set[str]
) -> dict[str, bytes]:
    """The TOCs the bundle carries as deltas, rebuilt against the TOCs this node holds and
    checked against their digests (tocdelta.decode). Nothing is written."""
    rebuilt: dict[str, bytes] = {}
    for delta in contents.deltas:
        if delta.key in carried or delta.key in rebuilt:
            raise BundleError(f"bundle entry {delta.key} is carried twice")
        base = cache.get_meta(delta.base)
        if base is None:
            raise BundleError(
                f"bundle entry {delta.key} is a delta against {delta.base}, which this node "
                "does not hold: export the bundle again with a current inventory"
            )
        rebuilt[delta.key] = tocdelta.decode(delta, layout.read_blob(delta.blob), base)
    return rebuilt


def _check_metadata(key: str, value: bytes) -> None:
    kind, _, named = key.partition(":")
    try:
        if kind == "blob":
            Digest.parse(named).verify(value, f"bundle entry {key}")
            return
        if kind == "estargz-toc":
            offset_line, _, toc_json = value.partition(b"\n")
            if not offset_line.isdigit() or estargz.toc_digest(toc_json) != named:
                raise BundleError(f"bundle entry {key}: the eStargz TOC does not match its digest")
            return
    except BundleError:
        raise
    except LazyfsError as exc:
        raise BundleError(f"bundle entry {key}: {exc}") from exc
    raise BundleError(f"bundle entry {key}: not a kind of metadata a bundle may carry")


def _check_chain(reference: str, root: Digest, metadata: dict[str, bytes]) -> None:
    """The image's manifest (every platform's, for an index), config and TOCs are there."""
    document = _needed(metadata, keys.blob_key(root), reference)
    parsed = parse_manifest_or_index(document, None)
    manifests = [parsed] if isinstance(parsed, Manifest) else []
    if isinstance(parsed, Index):
        present = [d for d in parsed.manifests if keys.blob_key(d.digest) in metadata]
        if not present:
            raise BundleError(f"{reference}: the bundle holds none of the index's manifests")
        for descriptor in present:
            data = metadata[keys.blob_key(descriptor.digest)]
            child = parse_manifest_or_index(data, descriptor.media_type)
            if isinstance(child, Manifest):
                manifests.append(child)
    for manifest in manifests:
        _needed(metadata, keys.blob_key(manifest.config.digest), reference)
        for layer in manifest.layers:
            annotations = layer.annotations
            checksum = annotations.get(TOC_CHECKSUM_ANNOTATION) or annotations.get(
                LEGACY_TOC_CHECKSUM_ANNOTATION
            )
            toc = estargz.TOC_DIGEST_ANNOTATION
            if checksum:
                _needed(metadata, keys.blob_key(checksum), reference)
            elif toc in annotations:
                _needed(metadata, keys.estargz_toc_key(annotations[toc]), reference)
            else:
                raise BundleError(f"{reference}: layer {layer.digest} is not lazy")


def _needed(metadata: dict[str, bytes], key: str, reference: str) -> bytes:
    value = metadata.get(key)
    if value is None:
        raise BundleError(f"{reference}: the bundle lacks {key}")
    return value


def _tag_key(reference: str) -> str:
    return keys.tag_key(Reference.parse(reference))


def _verified_chunks(layout: OciLayout, contents: BundleContents) -> Iterator[tuple[str, bytes]]:
    by_pack: dict[int, list[BundleChunk]] = {}
    for chunk in contents.chunks:
        by_pack.setdefault(chunk.pack, []).append(chunk)
    for index, pack in enumerate(contents.packs):
        members = by_pack.get(index, [])
        size = max((c.offset + c.length for c in members), default=0)
        try:
            data = zstd_exact(layout.read_blob(pack), size, f"bundle pack {pack}")
        except LazyfsError as exc:
            raise BundleError(str(exc)) from exc
        for chunk in members:
            piece = data[chunk.offset : chunk.offset + chunk.length]
            actual = format_verity(fsverity_digest(piece))
            if actual != chunk.verity:
                raise BundleError(f"bundle chunk {chunk.verity} does not match its digest")
            yield chunk.verity, piece


def _admit_chunks(layout: OciLayout, contents: BundleContents, cache: ChunkCache) -> int:
    admitted, batch = 0, []
    for verity, data in _verified_chunks(layout, contents):
        batch.append((verity, data))
        admitted += len(data)
        if len(batch) >= _WRITE_BATCH:
            cache.put_chunks(batch)
            batch = []
    if batch:
        cache.put_chunks(batch)
    return admitted
