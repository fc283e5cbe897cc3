"""EarlyFrames: which whole chunks of a request are handed on, and when (mount/earlyframes.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lazyfs.model.ranges import ByteRange
from lazyfs.mount.earlyframes import EarlyFrames

BLOB = bytes(range(256)) * 40  # 10,240 bytes


@dataclass(frozen=True)
class Frame:
    blob_offset: int
    blob_end: int


def listener(
    ranges: list[ByteRange], chunks: list[Frame], waited: set[int]
) -> tuple[EarlyFrames, list[list[tuple[int, bytes]]]]:
    handed: list[list[tuple[int, bytes]]] = []
    range_of = [next(i for i, r in enumerate(ranges) if r.start <= c.blob_offset < r.end)
                for c in chunks]  # fmt: skip
    frames = EarlyFrames(ranges, chunks, range_of, waited.__contains__, handed.append)
    return frames, handed


def tell(frames: EarlyFrames, start: int, end: int, step: int = 1000) -> None:
    for at in range(start, end, step):
        frames(at, BLOB[at : min(at + step, end)])


def test_whole_chunks_go_once_a_waited_one_is_whole() -> None:
    chunks = [Frame(0, 100), Frame(100, 3000), Frame(3000, 3500)]
    frames, handed = listener([ByteRange(0, 3500)], chunks, {1})
    tell(frames, 0, 2000)
    assert handed == []  # chunk 0 is whole, but nobody waits for it
    tell(frames, 2000, 3200)
    assert handed == [[(0, BLOB[0:100]), (1, BLOB[100:3000])]]
    tell(frames, 3200, 3500)
    assert len(handed) == 1  # the answer is over: its end serves chunk 2


def test_a_reader_that_comes_later_is_served_when_it_says_so() -> None:
    chunks = [Frame(0, 1000), Frame(1000, 2000), Frame(2000, 5000)]
    waited: set[int] = set()
    frames, handed = listener([ByteRange(0, 5000)], chunks, waited)
    tell(frames, 0, 2500)
    frames.wanted(2)  # not whole yet: nothing to do
    assert handed == []
    waited.add(0)
    frames.wanted(0)
    assert handed == [[(0, BLOB[0:1000]), (1, BLOB[1000:2000])]]
    waited.add(2)
    tell(frames, 2500, 4999)
    assert len(handed) == 1
    tell(frames, 4999, 5000)  # the last byte: the answer's end serves chunk 2
    assert len(handed) == 1
    frames.wanted(2)
    assert len(handed) == 1


def test_bytes_told_again_after_a_retry_are_ignored() -> None:
    chunks = [Frame(0, 1500), Frame(1500, 4000)]
    frames, handed = listener([ByteRange(0, 4000)], chunks, {0, 1})
    tell(frames, 0, 1000)
    tell(frames, 0, 2000, step=700)  # a second attempt from the start
    assert handed == [[(0, BLOB[0:1500])]]
    frames(5000, b"x" * 10)  # outside every range
    frames(3000, BLOB[3000:3100])  # a gap: not followed
    assert len(handed) == 1


def test_pieces_across_ranges_and_chunks_sharing_a_frame() -> None:
    """Two ranges answered as one covering part; two chunks in one compressed member."""
    ranges = [ByteRange(0, 1000), ByteRange(1000, 6000)]
    chunks = [Frame(0, 1000), Frame(1000, 2000), Frame(1000, 2000), Frame(2000, 6000)]
    frames, handed = listener(ranges, chunks, {2})
    frames(0, BLOB[0:2500])
    assert handed == [[(0, BLOB[0:1000]), (1, BLOB[1000:2000]), (2, BLOB[1000:2000])]]


def test_a_failing_hand_on_stops_the_listener_without_raising() -> None:
    calls = 0

    def ready(frames: list[tuple[int, bytes]]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    chunks = [Frame(0, 100), Frame(100, 200), Frame(200, 300)]
    frames = EarlyFrames([ByteRange(0, 300)], chunks, [0, 0, 0], lambda i: True, ready)
    frames(0, BLOB[0:150])
    frames(150, BLOB[150:250])
    assert calls == 1


def test_a_closed_listener_hears_nothing_and_holds_nothing() -> None:
    chunks = [Frame(0, 1000), Frame(1000, 2000), Frame(2000, 3000)]
    frames, handed = listener([ByteRange(0, 3000)], chunks, set())
    tell(frames, 0, 1500)
    frames.close()
    frames.wanted(0)
    tell(frames, 1500, 2500)
    assert handed == []
