"""Early frames: a request's chunks handed on as their bytes arrive, not when the answer ends.

A miss and its read-ahead go out in one request (the rest of the file, a pyc's source, the
next files of its directory: lazyfs/mount/readahead.py). Without this, the read that missed
waits for the whole answer, read-ahead included: on a thin link that is most of its latency,
and while a background fill runs it is what the fill's bytes compete with. Here the resolver's
``RangeListener`` (lazyfs/model/bytesource.py) follows each range's bytes as they arrive; once
a chunk that a reader waits for is whole, every whole chunk not yet handed on goes to
``ready``, which verifies and serves them (the resolver's ``_settle_early``). The rest wait
for the answer's end as before.

Nothing here is trusted: the frames are verified before any byte is served, and a frame that
fails is left to the end, where the strictly parsed answer decides (docs/concurrency.md,
"Early frames"). Event loop only; the listener never raises.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from lazyfs.model.ranges import ByteRange

log = logging.getLogger(__name__)


class Framed(Protocol):
    """A chunk of the request: where its frame lies in the blob."""

    @property
    def blob_offset(self) -> int: ...

    @property
    def blob_end(self) -> int: ...


class _Range:
    """One range's bytes so far: a contiguous prefix, kept as the pieces that arrived."""

    def __init__(self, rng: ByteRange, members: Sequence[int]) -> None:
        self.end = rng.end
        self.filled = rng.start  # the prefix [start, filled) has arrived
        self.pieces: list[tuple[int, bytes]] = []
        self.members = deque(members)  # indices of its chunks, in blob order, not yet whole

    def add(self, offset: int, data: bytes) -> int:
        """Take what extends the prefix; how many bytes that was."""
        end = min(offset + len(data), self.end)
        if offset > self.filled or end <= self.filled:
            return 0  # a gap (out of order: not followed), or bytes had already (a retry)
        self.pieces.append((self.filled, data[self.filled - offset : end - offset]))
        taken, self.filled = end - self.filled, end
        return taken

    def cut(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the prefix."""
        out = bytearray()
        for offset, data in self.pieces:
            if offset + len(data) > start and offset < end:
                out += data[max(start - offset, 0) : min(end, offset + len(data)) - offset]
        return bytes(out)

    def prune(self, keep_from: int) -> None:
        """Forget the pieces wholly before ``keep_from``."""
        self.pieces = [(o, d) for o, d in self.pieces if o + len(d) > keep_from]


class EarlyFrames:
    """The listener of one request: ``chunks[i]`` lies in ``ranges[range_of[i]]``;
    ``waited(i)`` says whether a reader waits for chunk i, asked once, when it becomes whole
    (a reader that comes later says so with ``wanted``); ``ready`` gets the indices and frames
    of whole chunks (each index once), when one of them is waited for and the answer is not
    over (at its end, the resolver's usual path takes what is left). Each socket read costs
    the chunks it completes, whatever the request's size."""

    def __init__(
        self,
        ranges: Sequence[ByteRange],
        chunks: Sequence[Framed],
        range_of: Sequence[int],
        waited: Callable[[int], bool],
        ready: Callable[[list[tuple[int, bytes]]], None],
    ) -> None:
        members: list[list[int]] = [[] for _ in ranges]
        for index, which in enumerate(range_of):
            members[which].append(index)
        self._ranges = [_Range(rng, m) for rng, m in zip(ranges, members, strict=True)]
        self._starts = [rng.start for rng in ranges]
        self._chunks = chunks
        self._waited = waited
        self._ready = ready
        self._left_bytes = sum(rng.length for rng in ranges)
        self._whole: dict[int, int] = {}  # chunk index -> its range: whole, not handed on
        self._stopped = False

    def __call__(self, offset: int, data: bytes) -> None:
        if not self._stopped:
            self._guarded(self._heard, offset, data)

    def close(self) -> None:
        """The answer is over (whole or failed): hear nothing more, and let its pieces go."""
        self._stopped = True
        self._whole.clear()
        for part in self._ranges:
            part.pieces = []

    def wanted(self, index: int) -> None:
        """A reader now waits for chunk ``index``: if it is whole, hand it on at once."""
        if not self._stopped and index in self._whole and self._left_bytes > 0:
            self._guarded(self._hand_on)

    def _guarded(self, step: Callable[..., None], *args: int | bytes) -> None:
        try:
            step(*args)
        except Exception:  # a bug here must cost only the early start, never the fetch
            log.exception("early frames: listener failed; the answer's end will serve")
            self._stopped = True

    def _heard(self, offset: int, data: bytes) -> None:
        which = max(0, bisect.bisect_right(self._starts, offset) - 1)
        end = offset + len(data)
        waited = False
        while which < len(self._ranges) and self._starts[which] < end:
            part = self._ranges[which]
            at = max(offset, self._starts[which])
            self._left_bytes -= part.add(at, data[at - offset :])
            while part.members and self._chunks[part.members[0]].blob_end <= part.filled:
                index = part.members.popleft()
                self._whole[index] = which
                waited = waited or self._waited(index)  # only the new ones: see ``wanted``
            which += 1
        if waited and self._left_bytes > 0:
            self._hand_on()

    def _hand_on(self) -> None:
        frames = []
        for index, which in self._whole.items():
            chunk = self._chunks[index]
            frames.append((index, self._ranges[which].cut(chunk.blob_offset, chunk.blob_end)))
        for which in set(self._whole.values()):
            part = self._ranges[which]
            first = self._chunks[part.members[0]].blob_offset if part.members else part.end
            part.prune(first)
        self._whole.clear()
        self._ready(frames)
