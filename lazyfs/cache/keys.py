"""Keys of the metadata store (``CACHE_DIR/meta``): built here and nowhere else.

Everything under a ``blob:`` or ``estargz-toc:`` key is checked against its digest when it is
read back, as it was when it was fetched.
"""

from __future__ import annotations

from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference


def tag_key(ref: Reference) -> str:
    """The digest a reference resolved to when the registry last answered."""
    return f"tag:{ref}"


def blob_key(digest: Digest | str) -> str:
    """A manifest, config or compressed zstd:chunked TOC, by its digest."""
    return f"blob:{digest}"


def estargz_toc_key(toc_digest: str) -> str:
    """An eStargz TOC (its offset line, then the JSON), by the annotation's digest."""
    return f"estargz-toc:{toc_digest}"


LOCAL_LAYER_PREFIX = "local-layer:"


def local_layer_key(source: Digest) -> str:
    """The digest of the local zstd:chunked blob a plain layer was converted into."""
    return f"{LOCAL_LAYER_PREFIX}{source}"


def local_toc_key(local: Digest) -> str:
    """The TOC of a locally converted layer."""
    return f"local-toc:{local}"


def alias_key(sha256: str) -> str:
    """The fs-verity digest of the chunk whose sha256 is ``sha256``."""
    return f"alias:{sha256}"


def profile_key(image: Digest) -> str:
    """The access profile last found attached to an image manifest (for offline mounts)."""
    return f"profile:{image}"


def kept_toc_key(checksum: Digest, blob_end: int) -> str:
    """A zstd:chunked TOC as checked for a blob whose payload ends at ``blob_end``, kept by
    mount/kepttocs.py (its own sha256 inside, not a digest of something fetched)."""
    return f"kept-toc:{checksum}:{blob_end}"
