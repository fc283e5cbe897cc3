"""The byte-source protocol: what the resolver fetches chunks from.

The resolver never sees httpx. Anything that returns byte ranges of a blob can serve a mount: a
registry and its mirrors (lazyfs/registry/sources.py), whole blobs kept in the cache
(lazyfs/cache/blobs.py), or a fault-injecting test double.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from lazyfs.model.digest import Digest
from lazyfs.model.ranges import ByteRange

# Told ``(blob offset, bytes)`` as bytes of an answer arrive, before the answer is whole and
# checked (a source may never call it, or call it again with the same bytes after a retry).
# It must not raise and must be quick: it runs on the event loop, inside the network read.
RangeListener = Callable[[int, bytes], None]


class ByteSource(Protocol):
    """Returns byte ranges of a blob, in the order asked; ``on_data``, if given, hears of their
    bytes as they arrive (so that a reader of the first chunks need not wait for the last)."""

    async def read_ranges(
        self, blob: Digest, ranges: Sequence[ByteRange], on_data: RangeListener | None = None
    ) -> list[bytes]: ...
