"""Content-defined chunk boundaries of a file's payload, read in bounded windows.

FastCDC (the ``fastcdc`` package's compiled implementation) decides where a chunk that starts at
``s`` ends from the bytes ``[s, s + max_chunk)`` alone. So a window is cut as a whole, and every
chunk whose ``max_chunk`` bytes of context lie inside the window is final; the next window starts
at the first chunk that was not. The boundaries are those of one ``fastcdc`` pass over the whole
payload, with memory bounded by the window whatever the file's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import fastcdc

from lazyfs.config import ChunkingConfig

# (offset, length) -> that many bytes of the payload, starting at offset.
ReadPayload = Callable[[int, int], memoryview]

WINDOW_BYTES = 4 << 20


def cut_points(
    size: int, read: ReadPayload, config: ChunkingConfig, window_bytes: int = WINDOW_BYTES
) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each chunk of a payload of ``size`` bytes, in order.

    A payload no larger than the minimum chunk is one chunk, and is not read.
    """
    if size <= config.min_chunk_bytes:
        if size:
            yield 0, size
        return
    window_bytes = max(window_bytes, 2 * config.max_chunk_bytes)
    base = 0
    while base < size:
        length = min(window_bytes, size - base)
        last_window = base + length == size
        view = read(base, length)
        next_base = base + length
        for chunk in fastcdc.fastcdc(
            view, config.min_chunk_bytes, config.avg_chunk_bytes, config.max_chunk_bytes
        ):
            if not last_window and chunk.offset + config.max_chunk_bytes > length:
                next_base = base + chunk.offset  # its context runs past the window: redo it
                break
            yield base + chunk.offset, chunk.length
        base = next_base
