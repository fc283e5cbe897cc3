"""The bundle format: an OCI image layout (a directory, or a tar of one).

``index.json`` lists one artifact manifest (``artifactType`` BUNDLE_ARTIFACT_TYPE, empty config)
whose only layer is the bundle's contents, a JSON document (BundleContents):

- ``images``: each reference with the digest its tag named (manifest or index) when exported;
- ``metadata``: cache metadata entries (manifests, configs, TOCs), each a blob named by the
  sha256 of its value, under the key lazyfs's cache keeps it (cache/keys.py);
- ``packs``: blobs of zstd frames, each the concatenation of chunks; ``chunks`` lists each
  chunk by fs-verity digest with its pack, offset and length, in profile order.

Every blob is named by its sha256 and checked against it when read; every chunk is checked
against its fs-verity digest; a pack never decompresses past the lengths its chunks declare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lazyfs.errors import BundleError
from lazyfs.model.digest import Digest

BUNDLE_ARTIFACT_TYPE = "application/vnd.lazyfs.bundle.v1+json"
CONTENTS_MEDIA_TYPE = "application/vnd.lazyfs.bundle.contents.v1+json"
PACK_MEDIA_TYPE = "application/vnd.lazyfs.bundle.pack.v1+zstd"
BUNDLE_VERSION = 1
PACK_TARGET_BYTES = 64 << 20  # uncompressed chunk bytes per pack
MAX_CONTENTS_BYTES = 256 << 20


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

    def to_json(self) -> bytes:
        document = {
            "version": BUNDLE_VERSION,
            "images": [{"reference": i.reference, "root": str(i.root)} for i in self.images],
            "metadata": [{"key": k, "blob": str(d)} for k, d in self.metadata],
            "packs": [str(p) for p in self.packs],
            "chunks": [[c.verity, c.pack, c.offset, c.length] for c in self.chunks],
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> BundleContents:
        try:
            document = json.loads(data)
            if document.get("version") != BUNDLE_VERSION:
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
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise BundleError(f"the bundle's contents are malformed: {exc}") from exc
        except Exception as exc:  # a Digest.parse error, say: still one clear line
            raise BundleError(f"the bundle's contents are malformed: {exc}") from exc
        return cls(images, metadata, packs, chunks)


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
