"""The byte-source protocol: what the resolver fetches chunks from.

The resolver never sees httpx. Anything that returns byte ranges of a blob can serve a mount: a
registry and its mirrors (lazyfs/registry/sources.py), whole blobs kept in the cache
(lazyfs/cache/blobs.py), or a fault-injecting test double.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange


class ByteSource(Protocol):
    """Returns byte ranges of a blob, in the order asked."""

    async def read_ranges(self, blob: Digest, ranges: Sequence[ByteRange]) -> list[bytes]: ...
