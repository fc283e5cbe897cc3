"""Access-profile ranks in a zstd:chunked TOC (``lazyfsPrefetch``, docs/format.md).

``lazyfs convert --prefetch PROFILE`` marks each chunk that the profile's reads touch with the
rank of the first such read, so that every mount of the image prefetches them in that order.
The same ranks, per file, decide the profile-first member order (``order.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lazyfs.formats.chunked.toc import TocEntry, group_file_entries
from lazyfs.model.profiles import AccessProfile, normalize_path


def mark_entries(entries: Sequence[TocEntry], profile: AccessProfile) -> tuple[TocEntry, ...]:
    """The entries of one layer, with ``prefetch`` ranks on the chunks the profile read.

    A chunk's rank is 1 + the index of the first read that overlaps it. Reads of a hardlink's
    other names count for the file it names."""
    wanted = reads_by_path(profile)
    aliases = hardlink_aliases(entries)
    marked: list[TocEntry] = []
    for group in group_file_entries(tuple(entries)):
        path = normalize_path(group[0].name)
        reads = wanted.get(path, []) + [r for a in aliases.get(path, ()) for r in wanted.get(a, [])]
        if group[0].type != "reg" or not reads:
            marked.extend(group)
            continue
        marked.extend(_mark_file(group, reads))
    return tuple(marked)


# path -> [(start, end, rank)]: the profile's reads of each path
ReadsByPath = dict[str, list[tuple[int, int, int]]]


def reads_by_path(profile: AccessProfile) -> ReadsByPath:
    """path -> [(start, end, rank)], in rank order."""
    by_path: dict[str, list[tuple[int, int, int]]] = {}
    for rank, read in enumerate(profile.reads, start=1):
        end = read.offset + max(read.length, 1)  # an empty read still names its chunk
        by_path.setdefault(read.path, []).append((read.offset, end, rank))
    return by_path


def hardlink_aliases(entries: Sequence[TocEntry]) -> dict[str, list[str]]:
    """target path -> the other names hardlinks in this layer give it"""
    aliases: dict[str, list[str]] = {}
    for entry in entries:
        if entry.type == "hardlink":
            target = normalize_path(entry.link_name)
            aliases.setdefault(target, []).append(normalize_path(entry.name))
    return aliases


def file_rank(reads: list[tuple[int, int, int]], size: int) -> int:
    """The lowest rank that any chunk of a ``size``-byte file gets from ``reads``; 0: none.

    Every byte of a non-empty file is in a chunk, so a read ranks a chunk if it starts inside
    the file (as in :func:`mark_entries`, a read of length 0 still names its chunk)."""
    ranks = [rank for start, _, rank in reads if start < size]
    return min(ranks) if ranks and size > 0 else 0


def _mark_file(group: list[TocEntry], reads: list[tuple[int, int, int]]) -> list[TocEntry]:
    size = group[0].size
    starts = [entry.chunk_offset for entry in group]
    marked = []
    for index, entry in enumerate(group):
        end = starts[index + 1] if index + 1 < len(group) else size
        ranks = [rank for lo, hi, rank in reads if lo < end and hi > starts[index]]
        marked.append(replace(entry, prefetch=min(ranks)) if ranks else entry)
    return marked
