"""The profile-first member order of a layer (``lazyfs convert --prefetch``, docs/format.md).

The files an access profile reads move to the front of the layer's tar, in the profile's order
(the rank of a file's first read, as ``ranks.py`` gives it), each after the directory entries
and opaque-whiteout markers it depends on (as eStargz moves a prioritized file's parents with
it); every other member follows in its original order, and the end-of-archive blocks stay last.
The chunks a mount prefetches are then one run at the start of each blob: a prefetch batch is
one range of a layer, not one range per file.

The extracted tree must stay what it was, whether the extractor applies each entry where it
meets it (an opaque marker removing what is there at that point, as old extractors did) or
follows the OCI rules (a whiteout hides only lower layers, wherever it is), and whatever lower
layers it extracts onto. So a member moves only if every earlier member it *interacts* with
moves before it: no two interacting members change their relative order. Two members interact
when a path one of them affects is the other's, or an ancestor or descendant of it; a member
affects its own path, a hardlink also its target, a whiteout ``d/.wh.x`` also ``d/x``, and an
opaque marker ``d/.wh..wh..opq`` also ``d`` (so all of ``d``). Only directory entries and
opaque markers move as dependencies: a file that an earlier hardlink, whiteout, symlink,
duplicate, or a child listed before its directory interacts with stays where it was. The root's
entry is the one exception to the last rule (tars often list ``./dev`` before ``./``):
extracting it never creates or replaces anything, it only sets the metadata of the directory
the layer is extracted into, so it may move ahead of members inside it.

Directory times: extractors that set them once the whole layer is extracted (containers/storage,
Python's tarfile) or that restore a directory's times after each entry in it (umoci) give the
same times; GNU tar sets them when it leaves a directory, so there a directory whose members are
split between the start and the rest gets the time of extraction.

Only whole members move (their extension headers, header, payload and padding, as bytes), so
every header is kept as it is; a tar with bytes between members (a global PAX header, which
applies to all members after it) keeps its order. The new order depends only on the tar and
the profile, so the output stays reproducible.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import CacheError, LayoutError
from lazyfs.formats.chunked.frames import read_exact
from lazyfs.formats.chunked.members import entry_for, iter_members
from lazyfs.formats.chunked.ranks import file_rank, reads_by_path
from lazyfs.model.digest import Digest
from lazyfs.model.profiles import AccessProfile, normalize_path

_BLOCK_BYTES = 512
_COPY_BYTES = 1 << 20
_WHITEOUT_PREFIX = ".wh."
_OPAQUE_MARKER = ".wh..wh..opq"

# What a member is to the ordering: the file to move, or a dependency that may move with it.
_FILE, _DIR, _OPAQUE, _OTHER = "file", "dir", "opaque", "other"


@dataclass(frozen=True)
class MemberOrder:
    """A layer's member order: byte ranges of the source tar, in the order to write them."""

    ranges: tuple[tuple[int, int], ...]  # [start, end) of each member, then the trailer
    moved_files: int = 0  # files of the profile placed first
    moved_members: int = 0  # those files and the directory entries and markers before them
    moved_bytes: int = 0  # tar bytes of the moved members: the start of the new tar
    kept_files: int = 0  # files the profile reads that had to stay in place
    note: str = ""  # why the order was kept as it was, if it was for all of the layer

    @property
    def changed(self) -> bool:
        return self.moved_members > 0


@dataclass(slots=True)
class _Member:
    index: int
    start: int
    end: int
    role: str
    path: str
    touches: tuple[str, ...]  # the paths whose subtree extracting this member affects
    size: int  # of a regular file's payload
    link: str  # a hardlink's target
    rank: int = 0  # for files the profile reads


def profile_first_order(tar_path: Path, profile: AccessProfile) -> MemberOrder:
    """The profile-first order of the tar at ``tar_path`` (TocError if it is not a tar)."""
    members, trailer, note = _scan(tar_path)
    if note:
        return MemberOrder(((0, trailer[1]),), note=note)
    _rank_files(members, profile)
    return _Planner(members).plan(trailer)


def write_member_order(
    tar_path: Path,
    order: MemberOrder,
    out_path: Path,
    on_progress: Callable[[int], None] | None = None,
) -> Digest:
    """Write the tar's bytes in ``order`` to ``out_path``; the sha256 of what was written (the
    new diff_id). ``on_progress`` is told the bytes written so far."""
    hasher = hashlib.sha256()
    done = 0
    try:
        fd = os.open(tar_path, os.O_RDONLY)
    except OSError as exc:
        raise LayoutError(f"cannot read the layer tar {tar_path}: {exc.strerror}") from exc
    try:
        with out_path.open("wb") as out:
            for start, end in order.ranges:
                for piece in _pieces(fd, start, end):
                    hasher.update(piece)
                    out.write(piece)
                    done += len(piece)
                    if on_progress is not None:
                        on_progress(done)
    except OSError as exc:
        where = out_path if exc.filename == str(out_path) else tar_path
        raise CacheError(f"cannot write the reordered layer tar {where}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return Digest("sha256", hasher.hexdigest())


def _pieces(fd: int, start: int, end: int) -> Iterator[bytes]:
    while start < end:
        length = min(_COPY_BYTES, end - start)
        yield read_exact(fd, start, length)
        start += length


def _scan(tar_path: Path) -> tuple[list[_Member], tuple[int, int], str]:
    """Every member with its byte range; the trailer's range; a note if members cannot move."""
    members: list[_Member] = []
    position = 0
    note = ""
    for info in iter_members(tar_path):
        if info.offset != position and not note:
            note = f"{info.offset - position} bytes between tar members (a global PAX header?)"
        entry = entry_for(info)
        payload = entry.size if entry.type == "reg" else 0
        end = info.offset_data + payload + (-payload % _BLOCK_BYTES)
        path = normalize_path(entry.name)
        role, touches = _role(entry.type, path, payload)
        link = normalize_path(entry.link_name) if entry.type == "hardlink" else ""
        if link:
            touches = (*touches, link)
        members.append(_Member(len(members), info.offset, end, role, path, touches, payload, link))
        position = end
    return members, (position, tar_path.stat().st_size), note


def _role(kind: str, path: str, payload: int) -> tuple[str, tuple[str, ...]]:
    parent, name = posixpath.split(path)
    if name == _OPAQUE_MARKER:
        return (_OPAQUE if kind == "reg" else _OTHER), (path, parent)
    if name.startswith(_WHITEOUT_PREFIX):
        return _OTHER, (path, posixpath.join(parent, name[len(_WHITEOUT_PREFIX) :]))
    if kind == "dir":
        return _DIR, (path,)
    return (_FILE if kind == "reg" and payload > 0 else _OTHER), (path,)


def _rank_files(members: list[_Member], profile: AccessProfile) -> None:
    """Give each file the lowest rank ``ranks.mark_entries`` gives one of its chunks (reads of
    its other names, hardlinks in this layer, count for it)."""
    wanted = reads_by_path(profile)
    aliases: dict[str, list[str]] = {}
    for member in members:
        if member.link:
            aliases.setdefault(member.link, []).append(member.path)
    for member in members:
        if member.role == _FILE:
            reads = wanted.get(member.path, []) + [
                read for alias in aliases.get(member.path, ()) for read in wanted.get(alias, [])
            ]
            member.rank = file_rank(reads, member.size) if reads else 0


class _Planner:
    """Picks the members to move, file by file in rank order, with their dependencies."""

    def __init__(self, members: list[_Member]) -> None:
        self._members = members
        self._moved = [False] * len(members)
        # path -> the members that affect exactly that path, in tar order
        self._at: dict[str, list[int]] = {}
        # path -> the first member that affects something strictly below it
        self._first_below: dict[str, int] = {}
        for member in members:
            for path in member.touches:
                self._at.setdefault(path, []).append(member.index)
                for ancestor in _ancestors(path):
                    self._first_below.setdefault(ancestor, member.index)

    def plan(self, trailer: tuple[int, int]) -> MemberOrder:
        ranked = sorted((m.rank, m.index) for m in self._members if m.rank > 0)
        prefix: list[int] = []
        kept = 0
        for _, index in ranked:
            closure = self._closure(index)
            if closure is None:
                kept += 1
                continue
            for moved in closure:
                self._moved[moved] = True
            prefix.extend(closure)
        rest = [m.index for m in self._members if not self._moved[m.index]]
        ranges = [(self._members[i].start, self._members[i].end) for i in prefix + rest]
        return MemberOrder(
            (*ranges, trailer),
            moved_files=len(ranked) - kept,
            moved_members=len(prefix),
            moved_bytes=sum(self._members[i].end - self._members[i].start for i in prefix),
            kept_files=kept,
        )

    def _closure(self, index: int) -> list[int] | None:
        """The members not moved yet that must move for member ``index`` to move, itself
        included, in tar order; None if one of them cannot move."""
        needed: set[int] = set()
        stack = [index]
        while stack:
            current = stack.pop()
            if current in needed:
                continue
            member = self._members[current]
            if current != index and member.role not in (_DIR, _OPAQUE):
                return None
            is_root = member.role == _DIR and member.path == "/"
            if not is_root and any(
                self._first_below.get(path, current) < current for path in member.touches
            ):
                return None  # something inside it comes before it
            needed.add(current)
            for path in member.touches:
                for scope in (*_ancestors(path), path):
                    for earlier in self._at.get(scope, ()):
                        if earlier >= current:
                            break
                        if not self._moved[earlier]:
                            stack.append(earlier)
        return sorted(needed)


def _ancestors(path: str) -> list[str]:
    """The strict ancestors of an absolute normalized path, root first ("/" has none)."""
    if path == "/":
        return []
    parts = path.split("/")[1:-1]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
