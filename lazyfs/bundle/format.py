"""The bundle format: an OCI image layout (a directory, or a tar of one).

``index.json`` lists one artifact manifest (``artifactType`` BUNDLE_ARTIFACT_TYPE, empty config)
whose only layer is the bundle's contents, a JSON document (BundleContents):

- ``images``: each reference with the digest its tag named (manifest or index) when exported;
- ``metadata``: cache metadata entries (manifests, configs, TOCs), each a blob named by the
  sha256 of its value, under the key lazyfs's cache keeps it (cache/keys.py);
- ``packs``: blobs of zstd frames, each the concatenation of chunks; ``chunks`` lists each
  chunk by fs-verity digest with its pack, offset and length, in profile order;
- ``deltas`` (version 2 only): metadata entries carried as a delta against a TOC the target
  holds (tocdelta.py), each rebuilt and checked against its key's digest on import. A bundle
  without deltas is written as version 1, which every importer reads.

Every blob is named by its sha256 and checked against it when read; every chunk is checked
against its fs-verity digest; a pack never decompresses past the lengths its chunks declare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lazyfs.bundle.tocdelta import TocDelta
from lazyfs.errors import BundleError
from lazyfs.model.digest import Digest

BUNDLE_ARTIFACT_TYPE = "application/vnd.lazyfs.bundle.v1+json"
CONTENTS_MEDIA_TYPE = "application/vnd.lazyfs.bundle.contents.v1+json"
PACK_MEDIA_TYPE = "application/vnd.lazyfs.bundle.pack.v1+zstd"
BUNDLE_VERSION = 1
DELTA_BUNDLE_VERSION = 2  # with TOC deltas
SUPPORTED_VERSIONS = (BUNDLE_VERSION, DELTA_BUNDLE_VERSION)
PACK_TARGET_BYTES = 64 << 20  # uncompressed chunk bytes per pack
MAX_CONTENTS_BYTES = 256 << 20
MAX_DELTAS = 4096


@dataclass(frozen=True)
class BundleImage:
    reference: str
    root: Digest  # what the tag named: a manifest or an index


@dataclass(frozen=True)
class BundleChunk:
    verity: str
    pack: int
    offset: int  # in the pack's uncompressed bytes
    length: int


@dataclass(frozen=True)
class BundleContents:
    images: tuple[BundleImage, ...]
    metadata: tuple[tuple[str, Digest], ...]  # (cache key, blob holding the value)
    packs: tuple[Digest, ...]
    chunks: tuple[BundleChunk, ...]
    deltas: tuple[TocDelta, ...] = ()

    def to_json(self) -> bytes:
        document: dict[str, object] = {
            "version": DELTA_BUNDLE_VERSION if self.deltas else BUNDLE_VERSION,
            "images": [{"reference": i.reference, "root": str(i.root)} for i in self.images],
            "metadata": [{"key": k, "blob": str(d)} for k, d in self.metadata],
            "packs": [str(p) for p in self.packs],
            "chunks": [[c.verity, c.pack, c.offset, c.length] for c in self.chunks],
        }
        if self.deltas:
            document["deltas"] = [delta.to_json() for delta in self.deltas]
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> BundleContents:
        try:
            document = json.loads(data)
            version = document.get("version")
            if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
                raise BundleError(f"bundle version {document.get('version')!r} is not supported")
            images = tuple(
                BundleImage(_text(i["reference"]), Digest.parse(_text(i["root"])))
                for i in document["images"]
            )
            metadata = tuple(
                (_text(m["key"]), Digest.parse(_text(m["blob"]))) for m in document["metadata"]
            )
            packs = tuple(Digest.parse(_text(p)) for p in document["packs"])
            chunks = tuple(_chunk(raw, len(packs)) for raw in document["chunks"])
            raw_deltas = document.get("deltas", []) if version == DELTA_BUNDLE_VERSION else []
            if len(raw_deltas) > MAX_DELTAS:  # each costs a TOC's rebuild on import
                raise BundleError(f"the bundle carries {len(raw_deltas)} TOC deltas")
            deltas = tuple(_delta(raw) for raw in raw_deltas)
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise BundleError(f"the bundle's contents are malformed: {exc}") from exc
        except Exception as exc:  # a Digest.parse error, say: still one clear line
            raise BundleError(f"the bundle's contents are malformed: {exc}") from exc
        return cls(images, metadata, packs, chunks, deltas)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise BundleError(f"expected a string in the bundle's contents, got {value!r}")
    return value


def _chunk(raw: object, packs: int) -> BundleChunk:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise BundleError(f"bundle chunk entry {raw!r} is not [verity, pack, offset, length]")
    verity, pack, offset, length = raw
    numbers = (pack, offset, length)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise BundleError(f"bundle chunk entry {raw!r} has a bad pack, offset or length")
    if pack >= packs or length > PACK_TARGET_BYTES * 2 or offset > PACK_TARGET_BYTES * 4:
        raise BundleError(f"bundle chunk entry {raw!r} points outside its pack")
    return BundleChunk(_text(verity), pack, offset, length)


def _delta(raw: object) -> TocDelta:
    if not isinstance(raw, dict):
        raise BundleError(f"bundle delta entry {raw!r} is not an object")
    size, level = raw["size"], raw["level"]
    numbers = (size, level)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        raise BundleError(f"bundle delta entry {raw!r} has a bad size or level")
    key, base = _text(raw["key"]), _text(raw["base"])
    for named in (key, base):
        if not named.startswith("blob:"):
            raise BundleError(f"bundle delta entry {raw!r}: {named} is not a blob's key")
        Digest.parse(named.removeprefix("blob:"))
    return TocDelta(key, base, Digest.parse(_text(raw["blob"])), size, level)
