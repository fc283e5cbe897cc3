"""Tests for lazyfs.model.ranges: merging, Range headers, Content-Range and multipart/byteranges."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import RegistryProtocolError
from lazyfs.model.ranges import (
    ByteRange,
    PartialBody,
    merge_ranges,
    parse_content_range,
    parse_multipart_byteranges,
    range_header,
    slice_ranges,
)

CONTENT_TYPE = "multipart/byteranges; boundary=THIS_STRING_SEPARATES"


def build_multipart(
    parts: list[tuple[ByteRange, bytes]],
    boundary: bytes = b"THIS_STRING_SEPARATES",
    *,
    total: int | None = None,
    newline: bytes = b"\r\n",
    preamble: bytes = b"",
    epilogue: bytes = b"",
) -> bytes:
    """A multipart/byteranges body laid out as RFC 9110 §14.6 and RFC 2046 describe."""
    size = "*" if total is None else str(total)
    out = bytearray(preamble)
    for byte_range, data in parts:
        out += b"--" + boundary + newline
        out += b"Content-Type: application/octet-stream" + newline
        header = f"Content-Range: bytes {byte_range.start}-{byte_range.end - 1}/{size}"
        out += header.encode() + newline + newline
        out += data + newline
    out += b"--" + boundary + b"--" + newline + epilogue
    return bytes(out)


# --- ByteRange --------------------------------------------------------------------------------


def test_byte_range_length_and_order() -> None:
    assert ByteRange(10, 15).length == 5
    assert sorted([ByteRange(5, 6), ByteRange(0, 9), ByteRange(0, 3)]) == [
        ByteRange(0, 3),
        ByteRange(0, 9),
        ByteRange(5, 6),
    ]


@pytest.mark.parametrize(("start", "end"), [(0, 0), (5, 4), (-1, 3)])
def test_byte_range_rejects_empty_or_negative(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        ByteRange(start, end)


# --- merge_ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranges", "gap", "expected"),
    [
        ([], 0, []),
        ([(0, 10)], 0, [(0, 10)]),
        ([(10, 20), (0, 5)], 0, [(0, 5), (10, 20)]),
        ([(0, 10), (10, 20)], 0, [(0, 20)]),
        ([(0, 10), (5, 8)], 0, [(0, 10)]),
        ([(0, 10), (5, 15), (14, 30)], 0, [(0, 30)]),
        ([(0, 10), (11, 20)], 0, [(0, 10), (11, 20)]),
        ([(0, 10), (11, 20)], 1, [(0, 20)]),
        ([(0, 10), (15, 20), (40, 50)], 5, [(0, 20), (40, 50)]),
        ([(0, 10), (0, 10)], 0, [(0, 10)]),
    ],
)
def test_merge_ranges(
    ranges: list[tuple[int, int]], gap: int, expected: list[tuple[int, int]]
) -> None:
    merged = merge_ranges((ByteRange(s, e) for s, e in ranges), max_gap_bytes=gap)
    assert merged == [ByteRange(s, e) for s, e in expected]


def test_merge_ranges_rejects_negative_gap() -> None:
    with pytest.raises(ValueError):
        merge_ranges([ByteRange(0, 1)], max_gap_bytes=-1)


byte_ranges = st.builds(
    lambda start, length: ByteRange(start, start + length),
    st.integers(0, 300),
    st.integers(1, 40),
)


def covered(ranges: list[ByteRange]) -> set[int]:
    return {offset for r in ranges for offset in range(r.start, r.end)}


@given(st.lists(byte_ranges, max_size=20))
def test_merge_without_gap_covers_exactly_the_union(ranges: list[ByteRange]) -> None:
    merged = merge_ranges(ranges)
    assert covered(merged) == covered(ranges)
    for previous, current in itertools.pairwise(merged):
        # Sorted, disjoint and not even touching, or they would have been merged.
        assert previous.end < current.start


@given(st.lists(byte_ranges, max_size=20), st.integers(0, 50))
def test_merge_with_gap_covers_union_and_keeps_larger_gaps(
    ranges: list[ByteRange], gap: int
) -> None:
    merged = merge_ranges(ranges, max_gap_bytes=gap)
    assert covered(ranges) <= covered(merged)
    for previous, current in itertools.pairwise(merged):
        assert current.start - previous.end > gap
    # Every merged range starts and ends on an input boundary: nothing is invented at the edges.
    assert {r.start for r in merged} <= {r.start for r in ranges}
    assert {r.end for r in merged} <= {r.end for r in ranges}


# --- range_header -----------------------------------------------------------------------------


def test_range_header_uses_inclusive_ends() -> None:
    assert range_header([ByteRange(0, 100), ByteRange(200, 300)]) == "bytes=0-99,200-299"
    assert range_header([ByteRange(5, 6)]) == "bytes=5-5"


def test_range_header_needs_a_range() -> None:
    with pytest.raises(ValueError):
        range_header([])


# --- parse_content_range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_range", "total"),
    [
        ("bytes 0-99/1234", ByteRange(0, 100), 1234),
        ("bytes 0-0/1", ByteRange(0, 1), 1),
        ("bytes 100-199/*", ByteRange(100, 200), None),
        ("Bytes 5-9/10", ByteRange(5, 10), 10),
        ("  bytes 5-9/10 ", ByteRange(5, 10), 10),
    ],
)
def test_parse_content_range(value: str, expected_range: ByteRange, total: int | None) -> None:
    assert parse_content_range(value) == (expected_range, total)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes",
        "bytes */1234",
        "bytes 0-99",
        "bytes 99-0/1234",
        "bytes 0-99/50",
        "bytes 0-99/99",
        "bytes -1-99/1234",
        "bytes +0-99/1234",
        "bytes 0-99/12x",
        "items 0-99/1234",
        "bytes 0-٩/1234",
        "bytes 0-99/1234, bytes 100-199/1234",
    ],
)
def test_parse_content_range_rejects_garbage(value: str) -> None:
    with pytest.raises(RegistryProtocolError):
        parse_content_range(value)


# --- parse_multipart_byteranges ---------------------------------------------------------------

TWO_PARTS = [(ByteRange(0, 5), b"hello"), (ByteRange(100, 106), b"world!")]


def test_multipart_two_parts() -> None:
    body = build_multipart(TWO_PARTS, total=1000)
    assert parse_multipart_byteranges(body, CONTENT_TYPE) == TWO_PARTS


def test_multipart_tolerates_preamble_epilogue_and_bare_lf() -> None:
    body = build_multipart(
        TWO_PARTS, newline=b"\n", preamble=b"ignored preamble\n", epilogue=b"ignored epilogue"
    )
    assert parse_multipart_byteranges(body, CONTENT_TYPE) == TWO_PARTS


def test_multipart_ignores_boundary_text_inside_the_preamble() -> None:
    body = b"see --THIS_STRING_SEPARATES here\r\n" + build_multipart(TWO_PARTS)
    assert parse_multipart_byteranges(body, CONTENT_TYPE) == TWO_PARTS


def test_multipart_quoted_boundary_and_case_insensitive_type() -> None:
    body = build_multipart(TWO_PARTS, boundary=b"a b:c")
    content_type = 'Multipart/ByteRanges; charset=x; boundary="a b:c"'
    assert parse_multipart_byteranges(body, content_type) == TWO_PARTS


def test_multipart_transport_padding_after_delimiter() -> None:
    body = build_multipart(TWO_PARTS).replace(b"SEPARATES\r\n", b"SEPARATES  \t\r\n")
    assert parse_multipart_byteranges(body, CONTENT_TYPE) == TWO_PARTS


def test_multipart_data_containing_the_boundary_is_taken_by_length() -> None:
    sneaky = b"\r\n--THIS_STRING_SEPARATES\r\n"
    parts = [(ByteRange(0, len(sneaky)), sneaky)]
    assert parse_multipart_byteranges(build_multipart(parts), CONTENT_TYPE) == parts


@pytest.mark.parametrize(
    "content_type",
    [
        "application/octet-stream",
        "multipart/byteranges",
        'multipart/byteranges; boundary=""',
        "multipart/byteranges; boundary=é",
        "multipart/byteranges; boundary=x\r\nX-Evil: 1",
        "",
    ],
)
def test_multipart_rejects_bad_content_type(content_type: str) -> None:
    with pytest.raises(RegistryProtocolError):
        parse_multipart_byteranges(build_multipart(TWO_PARTS), content_type)


def _malformed_bodies() -> list[bytes]:
    good = build_multipart(TWO_PARTS)
    return [
        b"",
        b"no boundary anywhere",
        b"--THIS_STRING_SEPARATES--\r\n",  # no parts at all
        good[: len(good) // 2],  # truncated mid-part
        # One byte short: "world\r" must not pass as six bytes followed by a bare-LF line end.
        good.replace(b"world!", b"world"),
        good.replace(b"Content-Range", b"Content-Rnage"),
        good.replace(b"bytes 100-105/*", b"bytes 105-100/*"),
        good.replace(b"Content-Type: application/octet-stream\r\n", b"Content-Type\r\n"),
        good.replace(b"hello\r\n--", b"hello!!\r\n--"),  # data longer than its Content-Range
        good.replace(b"SEPARATES\r\nContent-Type", b"SEPARATESContent-Type"),
        good.removesuffix(b"--THIS_STRING_SEPARATES--\r\n"),  # no close delimiter
        # The only remaining delimiter does not start a line, so it is preamble text.
        b"junk" + good.replace(b"\r\n--THIS_STRING_SEPARATES", b"\r\n--OTHER"),
        b"--THIS_STRING_SEPARATES\r\nContent-Range: bytes 0-4/5\r\n",  # headers never end
    ]


@pytest.mark.parametrize("body", _malformed_bodies())
def test_multipart_rejects_malformed_bodies(body: bytes) -> None:
    with pytest.raises(RegistryProtocolError):
        parse_multipart_byteranges(body, CONTENT_TYPE)


_boundaries = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?",
    min_size=1,
    max_size=70,
)
_parts = st.lists(
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=64)).map(
        lambda pair: (ByteRange(pair[0], pair[0] + len(pair[1])), pair[1])
    ),
    min_size=1,
    max_size=8,
)


@given(
    parts=_parts,
    boundary=_boundaries,
    newline=st.sampled_from([b"\r\n", b"\n"]),
    total=st.none() | st.just(20_000),
)
def test_multipart_round_trips(
    parts: list[tuple[ByteRange, bytes]], boundary: str, newline: bytes, total: int | None
) -> None:
    body = build_multipart(parts, boundary.encode(), total=total, newline=newline)
    content_type = f'multipart/byteranges; boundary="{boundary}"'
    assert parse_multipart_byteranges(body, content_type) == parts


# --- PartialBody: a 206 body followed as it streams in --------------------------------------


def _fed(body: PartialBody, data: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """What ``body`` finds in ``data`` read in pieces cut at ``cuts``, merged into runs."""
    runs: list[tuple[int, bytes]] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        for offset, piece in body.feed(data[start:end]):
            if runs and runs[-1][0] + len(runs[-1][1]) == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + piece)
            else:
                runs.append((offset, piece))
    return runs


@given(
    parts=_parts,
    boundary=_boundaries,
    newline=st.sampled_from([b"\r\n", b"\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=12),
)
def test_partial_body_finds_each_part_however_the_body_is_cut(
    parts: list[tuple[ByteRange, bytes]], boundary: str, newline: bytes, cuts: list[int]
) -> None:
    body = build_multipart(parts, boundary.encode(), total=20_000, newline=newline)
    content_type = f'multipart/byteranges; boundary="{boundary}"'
    found = _fed(PartialBody(content_type, None), body, cuts)
    merged: list[tuple[int, bytes]] = []
    for rng, data in parts:  # parts that touch come out as one run
        if merged and merged[-1][0] + len(merged[-1][1]) == rng.start:
            merged[-1] = (merged[-1][0], merged[-1][1] + data)
        else:
            merged.append((rng.start, data))
    assert found == merged


@given(cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_partial_body_of_one_part_starts_at_its_content_range(cuts: list[int]) -> None:
    data = bytes(range(256)) * 8
    body = PartialBody("application/octet-stream", "bytes 1000-3047/9999")
    assert _fed(body, data + b"trailing junk", cuts) == [(1000, data)]


@pytest.mark.parametrize(
    ("content_type", "content_range"),
    [
        ("application/octet-stream", None),  # no Content-Range: nothing is known
        ("application/octet-stream", "bytes 9-1/10"),
        ("multipart/byteranges", None),  # no boundary
    ],
)
def test_partial_body_that_cannot_be_followed_finds_nothing(
    content_type: str, content_range: str | None
) -> None:
    assert PartialBody(content_type, content_range).feed(b"x" * 100) == []


@given(data=st.binary(max_size=4000), cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_partial_body_never_raises_on_garbage(data: bytes, cuts: list[int]) -> None:
    body = b"--THIS_STRING_SEPARATES\r\n" + data
    for offset, piece in _fed(PartialBody(CONTENT_TYPE, None), body, cuts):
        assert offset >= 0 and piece


def test_partial_body_stops_at_headers_that_never_end() -> None:
    body = PartialBody(CONTENT_TYPE, None)
    assert body.feed(b"--THIS_STRING_SEPARATES\r\n" + b"X-Pad: y\r\n" * 4000) == []
    assert body.feed(b"Content-Range: bytes 0-1/2\r\n\r\nab") == []


# --- slice_ranges -----------------------------------------------------------------------------


def test_slice_ranges_cuts_relative_to_base_offset() -> None:
    data = bytes(range(100))
    ranges = [ByteRange(1000, 1002), ByteRange(1050, 1053), ByteRange(1099, 1100)]
    assert slice_ranges(data, 1000, ranges) == [b"\x00\x01", b"\x32\x33\x34", b"\x63"]
    assert slice_ranges(data, 1000, []) == []


@pytest.mark.parametrize("byte_range", [ByteRange(999, 1001), ByteRange(1090, 1101)])
def test_slice_ranges_rejects_uncovered_ranges(byte_range: ByteRange) -> None:
    with pytest.raises(RegistryProtocolError):
        slice_ranges(bytes(100), 1000, [byte_range])


@given(st.lists(byte_ranges, max_size=10), st.integers(0, 50))
def test_slice_of_merged_reads_equals_direct_slices(ranges: list[ByteRange], gap: int) -> None:
    blob = bytes(i % 251 for i in range(400))
    for merged in merge_ranges(ranges, max_gap_bytes=gap):
        inside = [r for r in ranges if merged.start <= r.start and r.end <= merged.end]
        chunk = blob[merged.start : merged.end]
        assert slice_ranges(chunk, merged.start, inside) == [blob[r.start : r.end] for r in inside]
