"""Readahead after a miss: the rest of the missed file and its source, then the next files of
its directory, as far as that directory has earned.

Cold start is RTT-bound: a workload reads files one after another, and each miss costs a round
trip. What the image says about what comes next:

- a file being read is usually read to its end, so the rest of the missed file comes first (up
  to ``readahead_max_bytes``);
- a compiled Python module, ``D/__pycache__/NAME.TAG.pyc``, is followed by its source
  ``D/NAME.py`` when the pyc is hash-checked (``py_compile``'s default with SOURCE_DATE_EPOCH
  set; the bench image's are), as CPython then reads the source to check it. A
  timestamp-checked pyc's source is fetched for nothing (a few KiB a module). It is elsewhere
  in the blob; a multi-range request brings both;
- files read together sit together in the layer (tar order is name order within a
  directory), but only within one directory: after the last file of a package's
  ``__pycache__`` come its sources, then other packages. So the next files are those of the
  missed file's directory, each with its source, for at most one bandwidth-delay product
  (rate x RTT, measured from the requests themselves, between ``readahead_min_bytes`` and
  ``readahead_next_files_max_bytes``).

Whether a directory's files are read together depends on the workload: Python's ``import
asyncio`` reads 29 of its 33 modules, but 35 of the 171 of the standard library's top level, 6
of 46 in ``lib-dynload``. So each directory earns its share (``directory_share``): a first
``readahead_directory_bytes`` (192 KiB), then ``readahead_directory_gain`` (2) bytes for each of
its read-ahead bytes that reads used, less all it was given, and never less than
``readahead_directory_min_bytes`` (16 KiB), a probe for a big directory read sparsely. Within
the share, files are taken whole with their sources, a file too big for what is left passed
over. On the bench's python image, replaying the reads of ``import json, asyncio, sqlite3,
email`` (``python -m lazyfs.bench.readaheadsim``): the rest of the file then 256 KiB of
whatever follows in the blob fetched 1.79x the bytes needed in 67 round trips, 54 % of
read-ahead used; this fetches 1.23x in 57, 85 % used; two other imports, 73 and 74 round trips
for 1.77x and 1.85x before, 74 and 71 for 1.25x and 1.29x now (docs/benchmarks.md, "Read-ahead
by directory").

A guess costs bytes too, and on a thin link bytes are what the operator pays for. The
:class:`ReadaheadBudget` keeps the (compressed) bytes fetched ahead at most
``readahead_max_bytes`` (one file's rest, before any read has needed anything) above the
(uncompressed) bytes that reads needed: the chunks reads missed, plus the read-ahead ones they
then used. Read-ahead therefore stops guessing where its guesses go unused. Counting both
sides compressed was measured too (docs/benchmarks.md): a third fewer bytes, but 1.5x slower
starts on ``wan`` and ``edge`` for the bench's python image, slower than a full pull.
"""

from __future__ import annotations

import bisect
import operator
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from lazyfs.config import ResolverConfig
from lazyfs.mount.tree import LayerChunk, Node, Tree

SCAN_FILES = 64  # files of a directory a miss looks at for read-ahead: bounded work per miss
SOURCES = "sources of pycs"  # the share pycs' sources earn (not a path: no directory's)
MISSED_FILES_MAX = 1 << 14  # files whose first miss is remembered (then forgotten all at once)


@dataclass
class LinkEstimate:
    """Round-trip time and throughput, estimated from completed range requests."""

    rtt_s: float | None = None
    rate_bytes_per_s: float | None = None
    _samples: int = field(default=0, repr=False)

    def record(self, size_bytes: int, elapsed_s: float) -> None:
        # Small requests measure the RTT; an average, so a stray fast or slow one fades out.
        if size_bytes <= 64 << 10:
            old_rtt = self.rtt_s
            self.rtt_s = elapsed_s if old_rtt is None else 0.7 * old_rtt + 0.3 * elapsed_s
        transfer_s = elapsed_s - (self.rtt_s or 0.0)
        if size_bytes >= 64 << 10 and transfer_s > 0:
            rate = size_bytes / transfer_s
            old = self.rate_bytes_per_s
            self.rate_bytes_per_s = rate if old is None else 0.7 * old + 0.3 * rate
        self._samples += 1

    def window_bytes(self, minimum: int, maximum: int) -> int:
        if self.rtt_s is None:
            return minimum
        rate = self.rate_bytes_per_s or minimum / max(self.rtt_s, 1e-6)
        return int(min(maximum, max(minimum, rate * self.rtt_s)))


@dataclass
class ReadaheadBudget:
    """Bytes read-ahead may still spend: credit + needed - fetched ahead, and each directory's
    share of it (event loop only)."""

    needed_bytes: int = 0  # uncompressed: missed by reads, or fetched ahead and then read
    ahead_bytes: int = 0  # compressed: fetched ahead
    used_bytes: int = 0  # compressed: fetched ahead and then read
    credit_bytes: int = 0  # allowed before any read needed anything (one file's rest)
    _unused: dict[str, tuple[int, int, str | None]] = field(default_factory=dict, repr=False)
    _missed_files: set[str] = field(default_factory=set, repr=False)
    _directories: dict[str, list[int]] = field(default_factory=dict, repr=False)  # [ahead, used]

    def missed(self, size_bytes: int) -> None:
        self.needed_bytes += size_bytes

    def fetched_ahead(
        self, key: str, compressed_bytes: int, size_bytes: int, directory: str | None = None
    ) -> None:
        """``key`` was fetched ahead; ``directory`` names the share that paid for it (the next
        files of that directory, or pycs' sources), None for the rest of the missed file."""
        self.ahead_bytes += compressed_bytes
        self._unused[key] = (compressed_bytes, size_bytes, directory)
        if directory is not None:
            self._directories.setdefault(directory, [0, 0])[0] += compressed_bytes

    def read(self, key: str) -> None:
        """A read wanted ``key``; if read-ahead brought it, it was needed after all."""
        compressed, size, directory = self._unused.pop(key, (0, 0, None))
        self.needed_bytes += size
        self.used_bytes += compressed
        if directory is not None:
            self._directories[directory][1] += compressed

    @property
    def allowance_bytes(self) -> int:
        return max(0, self.credit_bytes + self.needed_bytes - self.ahead_bytes)

    def rest_of_file_share(self, path: str, first_bytes: int, most_bytes: int) -> int:
        """What a miss of ``path`` may fetch of the rest of its file: ``first_bytes`` at its
        first miss, all of it (up to ``most_bytes``) at any later one. A file read only in part
        (``head -c 64k`` of a big one) costs one window, not its rest; a file read on (an
        executable, a library, a file read whole) misses again past that window, and then
        brings the rest in one round trip more."""
        if path in self._missed_files:
            return most_bytes
        if len(self._missed_files) >= MISSED_FILES_MAX:
            self._missed_files.clear()
        self._missed_files.add(path)
        return first_bytes

    def directory_share(
        self, directory: str, first_bytes: int, gain: float, least_bytes: int = 0
    ) -> int:
        """What the next files of ``directory`` may take now: ``first_bytes`` while nothing is
        known, plus ``gain`` bytes for each byte of its read-ahead that reads used, minus all
        it was given, but never less than ``least_bytes``. A directory whose files the
        workload reads together (a package) earns more; one it reads a file or two of
        (``lib/``) soon gets only the least. That least is a probe: in a big directory read
        sparsely (Python's standard library, 55 of 171 modules for one workload), reads of
        what read-ahead brought come long after it, in import order, not name order."""
        ahead, used = self._directories.get(directory, (0, 0))
        return max(least_bytes, int(first_bytes + gain * used - ahead))


class _Placed(NamedTuple):  # a tuple: one per chunk of the image, made at mount time
    blob_offset: int
    chunk: LayerChunk
    node: Node


_blob_offset = operator.attrgetter("blob_offset")


class BlobIndex:
    """Every chunk of every layer, in blob order, to find what follows a chunk.

    A file is known by its path, not its node: the index is built from the merged tree, and a
    layer store's reads come with the nodes of each layer's own tree (mount/layerstore.py),
    which are other objects with other inode numbers for the same files."""

    def __init__(self, placed: Iterable[_Placed], sources: dict[str, Node] | None = None) -> None:
        self._sources = sources or {}  # path of a compiled file -> its source file
        self._by_layer: dict[int, list[_Placed]] = {}
        for item in placed:
            self._by_layer.setdefault(item.chunk.layer, []).append(item)
        for items in self._by_layer.values():
            items.sort(key=_blob_offset)
        self._offsets = {
            layer: [p.blob_offset for p in items] for layer, items in self._by_layer.items()
        }

    @classmethod
    def of_tree(cls, tree: Tree) -> BlobIndex:
        seen: set[tuple[int, int]] = set()
        placed = []
        for node in tree.nodes.values():
            for chunk in node.chunks:
                ref = chunk.ref
                where = (chunk.layer, ref.blob_offset)
                if where not in seen and not ref.zeros:
                    seen.add(where)
                    placed.append(_Placed(ref.blob_offset, chunk, node))
        return cls(placed, _sources(tree))

    def following(self, chunk: LayerChunk, budget_bytes: int) -> list[tuple[Node, LayerChunk]]:
        """Chunks after ``chunk`` in its blob, until about ``budget_bytes`` compressed bytes."""
        items = self._by_layer.get(chunk.layer, [])
        start = bisect.bisect_right(self._offsets.get(chunk.layer, []), chunk.ref.blob_offset)
        picked: list[tuple[Node, LayerChunk]] = []
        spent = 0
        for item in items[start:]:
            if spent >= budget_bytes:
                break
            picked.append((item.node, item.chunk))
            spent += item.chunk.ref.blob_end - item.chunk.ref.blob_offset
        return picked

    def ahead_of(
        self, chunk: LayerChunk, node: Node, file_bytes: int, other_bytes: int
    ) -> list[tuple[Node, LayerChunk]]:
        """What to fetch ahead of a miss of ``node``'s ``chunk``: the rest of ``node``, up to
        ``file_bytes`` compressed, then the chunks that follow it in the blob (the next files
        of the layer), up to ``other_bytes``. Each chunk is taken only if it fits."""
        picked: list[tuple[Node, LayerChunk]] = []
        items = self._by_layer.get(chunk.layer, [])
        start = bisect.bisect_right(self._offsets.get(chunk.layer, []), chunk.ref.blob_offset)
        in_file, beyond = 0, 0
        for item in items[start:]:
            size = item.chunk.ref.blob_end - item.chunk.ref.blob_offset
            if _same_file(item.node, node) and beyond == 0:
                if in_file + size > file_bytes:
                    break
                in_file += size
            else:
                if beyond + size > other_bytes:
                    break
                beyond += size
            picked.append((item.node, item.chunk))
        return picked

    def ahead_in_directory(
        self,
        chunk: LayerChunk,
        node: Node,
        file_bytes: int,
        directory_bytes: int,
        present: Callable[[LayerChunk], bool] = lambda chunk: False,
        sources: bool = True,
    ) -> list[Ahead]:
        """What to fetch ahead of a miss of ``node``'s ``chunk``: the rest of ``node`` and, if
        it is compiled Python, its source (which CPython reads next to check the cache: the
        image's pycs are hash-based), both up to ``file_bytes`` compressed; then, of the next
        ``SCAN_FILES`` files after ``node`` in the blob that are in its directory (a package's
        ``__pycache__``, in name order), those that fit in ``directory_bytes``, each whole
        with its source. A file too big for what is left is passed over, not the end of the
        walk: in a directory the workload reads little of, a small file is as likely to be
        read as a big one, and a hit saves a round trip either way. Chunks ``present`` says
        are here or on their way are passed over and cost nothing. The missed file's source is
        tagged ``SOURCES``: whether it is read earns the share of sources (the next files'
        are their directory's); without ``sources``, no source is taken."""
        items = self._by_layer.get(chunk.layer, [])
        start = bisect.bisect_right(self._offsets.get(chunk.layer, []), chunk.ref.blob_offset)
        picked: list[Ahead] = []
        own = 0
        for item in items[start:]:
            if not _same_file(item.node, node):
                break
            if present(item.chunk):
                continue
            own += _blob_size(item.chunk)
            if own > file_bytes:
                return picked
            picked.append(Ahead(node, item.chunk, None))
        if sources:
            source = self._source_chunks(node, file_bytes - own, present)
            picked += (Ahead(s_node, s_chunk, SOURCES) for s_node, s_chunk in source)
        directory = posixpath.dirname(node.path)
        spent = 0
        for sibling, chunks in self._next_in_directory(items, start, node, directory):
            whole = [(sibling, c) for c in chunks if not present(c)]
            source = self._source_chunks(sibling, directory_bytes, present) if sources else []
            size = sum(_blob_size(c) for _, c in whole + source)
            if whole and spent + size <= directory_bytes:
                spent += size
                picked += (Ahead(n, c, directory) for n, c in whole + source)
        return picked

    def _next_in_directory(
        self, items: list[_Placed], start: int, node: Node, directory: str
    ) -> Iterator[tuple[Node, list[LayerChunk]]]:
        """The next ``SCAN_FILES`` files from ``items[start]`` on that are in ``directory``
        (but ``node``), with their chunks."""
        files = 0
        current: Node | None = None
        chunks: list[LayerChunk] = []
        for item in items[start:]:
            if _same_file(item.node, node):
                continue
            if item.node is not current:
                if current is not None:
                    yield current, chunks
                files += 1
                if files > SCAN_FILES or posixpath.dirname(item.node.path) != directory:
                    return
                current, chunks = item.node, []
            chunks.append(item.chunk)
        if current is not None:
            yield current, chunks

    def _source_chunks(
        self, node: Node, limit_bytes: int, present: Callable[[LayerChunk], bool]
    ) -> list[tuple[Node, LayerChunk]]:
        """The chunks of ``node``'s source file not ``present``, if it has a source and they
        fit in ``limit_bytes``."""
        source = self._sources.get(node.path)
        if source is None:
            return []
        chunks = [(source, c) for c in source.chunks if not c.ref.zeros and not present(c)]
        return chunks if sum(_blob_size(c) for _, c in chunks) <= limit_bytes else []


class Ahead(NamedTuple):
    """A chunk to fetch ahead, and the share that pays for it: a directory's, ``SOURCES``, or
    None (the missed file's own rest)."""

    node: Node
    chunk: LayerChunk
    directory: str | None


def _same_file(indexed: Node, read: Node) -> bool:
    """Whether the index's ``indexed`` is the file of ``read``, a node of the merged tree or of
    one layer's own tree (BlobIndex)."""
    return indexed is read or indexed.path == read.path


def _blob_size(chunk: LayerChunk) -> int:
    return chunk.ref.blob_end - chunk.ref.blob_offset


def _sources(tree: Tree) -> dict[str, Node]:
    """Compiled Python files and their sources: ``D/__pycache__/NAME.TAG.pyc`` -> ``D/NAME.py``
    (PEP 3147), when both are regular files."""
    found: dict[str, Node] = {}
    for node in tree.nodes.values():
        directory, name = posixpath.split(node.path)
        if node.kind != "reg" or not name.endswith(".pyc"):
            continue
        parent, cache = posixpath.split(directory)
        if cache != "__pycache__":
            continue
        source = tree.find(posixpath.join(parent, name.partition(".")[0] + ".py"))
        if source is not None and source.kind == "reg":
            found[node.path] = source
    return found


def plan_ahead(
    index: BlobIndex,
    budget: ReadaheadBudget,
    chunk: LayerChunk,
    node: Node,
    config: ResolverConfig,
    window_bytes: int,
    present: Callable[[LayerChunk], bool] = lambda chunk: False,
) -> list[Ahead]:
    """What a miss of ``node``'s ``chunk`` fetches ahead (the resolver's choice, and the
    replay's): the rest of the file (one window at its first miss, then all of it) and its
    source within the budget, then the next files of its directory within the directory's
    share and one bandwidth-delay product."""
    allowance = budget.allowance_bytes
    first = min(config.readahead_first_bytes, config.readahead_max_bytes)
    rest_of_file = min(
        allowance, budget.rest_of_file_share(node.path, first, config.readahead_max_bytes)
    )
    if rest_of_file <= 0:
        return []
    share = budget.directory_share(
        posixpath.dirname(node.path),
        min(window_bytes, config.readahead_directory_bytes),
        config.readahead_directory_gain,
        min(window_bytes, config.readahead_directory_min_bytes),
    )
    # Sources are read only for hash-checked pycs: the missed pycs' sources earn a share of
    # their own, as a directory does, and no source is fetched once that is spent unread.
    sources = (
        budget.directory_share(
            SOURCES, config.readahead_directory_bytes, config.readahead_directory_gain
        )
        > 0
    )
    return index.ahead_in_directory(
        chunk, node, rest_of_file, min(allowance, window_bytes, share), present, sources
    )
