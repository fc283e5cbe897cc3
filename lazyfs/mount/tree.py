"""The merged root filesystem of an image: layers applied in order with OCI whiteouts.

A pure model, built once at mount time from each layer's TOC entries and then only read, so the
FUSE handlers can use it without locks. Semantics follow the OCI image-spec layer rules:

- ``.wh.NAME`` deletes NAME (and everything below it) from the layers underneath;
- ``.wh..wh..opq`` in a directory hides everything the lower layers put in it;
- whiteouts only act on lower layers, so a layer's whiteouts are applied before its entries;
- a non-directory replaces whatever was at its path; a directory over a directory merges;
- a hardlink names an earlier path and shares its inode (``st_nlink`` counts the names).

``build_layer_tree`` builds one layer's own tree instead, for a runtime that stacks layers
itself with overlayfs (the additional layer store, mount/layerstore.py). Whiteouts then stay in
the tree in overlayfs form: ``.wh.NAME`` becomes a 0/0 character device NAME, and
``.wh..wh..opq`` the ``trusted.overlay.opaque`` xattr of its directory. overlayfs trusts
``trusted.overlay.*`` xattrs of its lower layers (redirects, metacopy), so an image's own are
dropped: only the opaque marks this builder sets reach overlayfs.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lazyfs.errors import TocError
from lazyfs.formats.chunked.toc import (
    ChunkRef,
    TocEntry,
    file_chunks,
    group_file_entries,
    name_bytes,
    parse_rfc3339_ns,
)

ROOT_INODE = 1
WHITEOUT_PREFIX = ".wh."
_WHITEOUT_PREFIX_BYTES = WHITEOUT_PREFIX.encode()
OPAQUE_MARKER = ".wh..wh..opq"
_OPAQUE_MARKER_BYTES = OPAQUE_MARKER.encode()
OVERLAY_XATTR_PREFIX = b"trusted.overlay."
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"

_KIND_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


@dataclass(frozen=True)
class LayerChunk:
    """A chunk of file content, and the layer blob that holds it."""

    layer: int
    ref: ChunkRef


@dataclass(eq=False, slots=True)  # slots: less memory per inode, faster attributes
class Node:
    """One inode of the merged tree."""

    kind: str
    mode: int  # permission bits, with setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    chunks: tuple[LayerChunk, ...] = ()
    verity: str = ""  # fs-verity digest of the whole file, when the layer format has one
    layer: int = -1  # the layer the node came from
    inode: int = 0
    nlink: int = 1
    children: dict[bytes, Node] | None = None
    path: str = "/"  # the first path that names this node, for messages

    @property
    def st_mode(self) -> int:
        return _KIND_BITS[self.kind] | (self.mode & 0o7777)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


@dataclass(frozen=True)
class Tree:
    """The finished, read-only tree: inode table and sorted directory listings."""

    nodes: dict[int, Node]
    listings: dict[int, tuple[tuple[bytes, Node], ...]]

    @property
    def root(self) -> Node:
        return self.nodes[ROOT_INODE]

    def lookup(self, parent: int, name: bytes) -> Node | None:
        children = self.nodes[parent].children
        return None if children is None else children.get(name)

    def find(self, path: str) -> Node | None:
        """The node at an absolute path, without following symlinks; None if there is none."""
        node: Node | None = self.root
        for part in _split(path):
            children = node.children if node is not None else None
            node = None if children is None else children.get(part)
        return node

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Every (path, node) pair, depth first; hardlinked nodes appear once per name."""
        stack: list[tuple[bytes, Node]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for name, child in reversed(self.listings.get(node.inode, ())):
                stack.append((posixpath.join(path, name), child))


def build_tree(layers: Sequence[Iterable[TocEntry]]) -> Tree:
    """Apply layers bottom to top and number the inodes."""
    return build_trees(layers)[0]


def build_layer_tree(entries: Iterable[TocEntry], layer: int) -> Tree:
    """One layer's own tree, whiteouts in overlayfs form; chunks refer to layer ``layer``."""
    try:
        files = _prepare(entries)
    except TocError as exc:
        raise TocError(f"layer {layer}: {exc}") from exc
    return _layer_tree(files, layer)


def build_trees(
    layers: Sequence[Iterable[TocEntry]], *, per_layer: bool = False
) -> tuple[Tree, tuple[Tree, ...]]:
    """The merged tree, and with ``per_layer`` each layer's own tree too (``build_layer_tree``).

    The trees share what depends on the entries only: each file's path components and its
    chunks (``LayerChunk`` tuples, immutable), worked out once per layer."""
    prepared: list[list[_File]] = []
    root = _new_dir(-1)
    for index, entries in enumerate(layers):
        try:
            prepared.append(_prepare(entries))
            _apply_layer(root, index, prepared[-1])
        except TocError as exc:  # name the layer: the image may have many
            raise TocError(f"layer {index}: {exc}") from exc
    merged = _finish(root)
    if not per_layer:
        return merged, ()
    return merged, tuple(_layer_tree(files, index) for index, files in enumerate(prepared))


# One TOC entry with the chunk entries after it, as the builders use it: [path components,
# entries, chunks or None until the first builder that adds the file works them out].
_File = list[Any]


def _prepare(entries: Iterable[TocEntry]) -> list[_File]:
    return [[_split(group[0].name), group, None] for group in group_file_entries(tuple(entries))]


def _file_chunks(file: _File, layer: int) -> tuple[LayerChunk, ...]:
    chunks: tuple[LayerChunk, ...] | None = file[2]
    if chunks is None:
        chunks = file[2] = tuple(_layer_chunk(layer, ref) for ref in file_chunks(file[1]))
    return chunks


def _layer_chunk(layer: int, ref: ChunkRef) -> LayerChunk:
    """``LayerChunk(layer, ref)`` without the frozen dataclass's ``__init__`` (one per chunk
    per tree was a tenth of building it)."""
    chunk = _NEW(LayerChunk)
    _SET(chunk, "__dict__", {"layer": layer, "ref": ref})
    return chunk


_NEW = object.__new__
_SET = object.__setattr__


def _new_dir(layer: int) -> Node:
    return Node("dir", 0o755, layer=layer, children={})


def _layer_tree(files: list[_File], layer: int) -> Tree:
    root = _new_dir(-1)
    try:
        opaque = _add_layer_entries(root, layer, files)
    except TocError as exc:
        raise TocError(f"layer {layer}: {exc}") from exc
    for node in _all_nodes(root):
        if node.xattrs:
            for name in [n for n in node.xattrs if n.startswith(OVERLAY_XATTR_PREFIX)]:
                del node.xattrs[name]
    for directory in opaque:  # after the metadata: a directory's entry may follow its marker
        directory.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
    return _finish(root)


class _Dirs:
    """The directories of one pass over a layer's entries, found from the root, with the last
    one remembered: entries come in tar order, so most share the previous entry's parent. The
    memory is dropped whenever a directory is replaced, since what was below it is gone."""

    __slots__ = ("_last", "_last_parts", "layer", "root")

    def __init__(self, root: Node, layer: int) -> None:
        self.root = root
        self.layer = layer
        self._last_parts: list[bytes] | None = None
        self._last = root

    def ensure(self, parts: list[bytes]) -> Node:
        """The directory at ``parts``, created (0755, root-owned) where a layer left it
        implicit."""
        if parts == self._last_parts:
            return self._last
        node = self.root
        for part in parts:
            children = node.children
            assert children is not None
            child = children.get(part)
            if child is None or child.kind != "dir":
                child = children[part] = _new_dir(self.layer)
            node = child
        self._last_parts, self._last = parts, node
        return node

    def put(self, parent: Node, name: bytes, node: Node) -> None:
        """``parent``'s entry ``name`` is ``node`` from now on."""
        children = parent.children
        assert children is not None
        old = children.get(name)
        if old is not None and old.kind == "dir":
            self._last_parts = None
        children[name] = node


def _add_layer_entries(root: Node, layer: int, files: list[_File]) -> list[Node]:
    """Add a layer's entries as they are; returns the directories marked opaque."""
    opaque: list[Node] = []
    deferred: list[_File] = []
    dirs = _Dirs(root, layer)
    for file in files:
        parts, group = file[0], file[1]
        if parts and parts[-1] == _OPAQUE_MARKER_BYTES:
            opaque.append(dirs.ensure(parts[:-1]))
        elif parts and parts[-1].startswith(_WHITEOUT_PREFIX_BYTES):
            _add_whiteout_device(dirs, parts, group[0])
        elif group[0].type == "hardlink" and _hardlink_target(root, group[0]) is None:
            deferred.append(file)
        else:
            _add_entry(dirs, file)
    for file in deferred:
        _add_entry(dirs, file)
    return opaque


def _add_whiteout_device(dirs: _Dirs, parts: list[bytes], entry: TocEntry) -> None:
    name = parts[-1][len(_WHITEOUT_PREFIX_BYTES) :]
    if not name:
        raise TocError(f"whiteout {entry.name!r} names nothing")
    parent = dirs.ensure(parts[:-1])
    whiteout = Node(kind="char", mode=0, layer=dirs.layer, rdev=0)
    whiteout.mtime_ns = parse_rfc3339_ns(entry.modtime)
    dirs.put(parent, name, whiteout)


def _all_nodes(root: Node) -> Iterator[Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if node.children:
            stack.extend(child for child in node.children.values() if child.is_dir)
            yield from (child for child in node.children.values() if not child.is_dir)


def _apply_layer(root: Node, layer: int, files: list[_File]) -> None:
    for file in files:
        _apply_whiteout(root, file[0])
    deferred: list[_File] = []  # hardlinks before their target
    dirs = _Dirs(root, layer)
    for file in files:
        parts, group = file[0], file[1]
        if parts and parts[-1].startswith(_WHITEOUT_PREFIX_BYTES):
            continue
        if group[0].type == "hardlink" and _hardlink_target(root, group[0]) is None:
            deferred.append(file)
            continue
        _add_entry(dirs, file)
    for file in deferred:
        _add_entry(dirs, file)


def _split(name: str) -> list[bytes]:
    """``name``'s components as the merged tree names them (``..`` stops at the root)."""
    try:  # the whole name at once: the common case, and several times faster
        parts = name.encode("utf-8", "surrogateescape").split(b"/")
    except UnicodeEncodeError:
        parts = [name_bytes(part) for part in name.split("/")]
    if b".." in parts:  # rare: resolved as a path from the root, where ".." stops
        clean = posixpath.normpath("/" + name).lstrip("/")
        try:
            parts = clean.encode("utf-8", "surrogateescape").split(b"/")
        except UnicodeEncodeError:
            parts = [name_bytes(part) for part in clean.split("/")]
    return [part for part in parts if part and part != b"."]


def _apply_whiteout(root: Node, parts: list[bytes]) -> None:
    if not parts or not parts[-1].startswith(_WHITEOUT_PREFIX_BYTES):
        return
    parent = _find_dir(root, parts[:-1])
    if parent is None or parent.children is None:
        return
    if parts[-1] == _OPAQUE_MARKER_BYTES:
        parent.children.clear()
    else:
        parent.children.pop(parts[-1][len(WHITEOUT_PREFIX) :], None)


def _find_dir(root: Node, parts: list[bytes]) -> Node | None:
    node = root
    for part in parts:
        child = node.children.get(part) if node.children is not None else None
        if child is None or not child.is_dir:
            return None
        node = child
    return node


def _add_entry(dirs: _Dirs, file: _File) -> None:
    parts, group = file[0], file[1]
    head = group[0]
    layer = dirs.layer
    if not parts:  # the root directory's own metadata
        _set_metadata(dirs.root, head, layer)
        return
    parent = dirs.ensure(parts[:-1])
    assert parent.children is not None
    if head.type == "hardlink":
        dirs.put(parent, parts[-1], _resolve_hardlink(dirs.root, head))
        return
    existing = parent.children.get(parts[-1])
    if head.type == "dir" and existing is not None and existing.kind == "dir":
        _set_metadata(existing, head, layer)
        return
    dirs.put(parent, parts[-1], _new_node(head, file, layer))


def _hardlink_target(root: Node, entry: TocEntry) -> Node | None:
    parts = _split(entry.link_name)
    parent = _find_dir(root, parts[:-1])
    target = parent.children.get(parts[-1]) if parent and parent.children and parts else None
    return None if target is None or target.is_dir else target


def _resolve_hardlink(root: Node, entry: TocEntry) -> Node:
    target = _hardlink_target(root, entry)
    if target is None:
        raise TocError(f"hardlink {entry.name!r} points to missing {entry.link_name!r}")
    return target


def _new_node(head: TocEntry, file: _File, layer: int) -> Node:
    kind = head.type
    if kind not in _KIND_BITS:
        raise TocError(f"TOC entry {head.name!r} has unexpected type {kind!r}")
    mtime_ns = parse_rfc3339_ns(head.modtime)
    xattrs = _xattrs(head)
    size, rdev, target, verity = 0, 0, b"", ""
    chunks: tuple[LayerChunk, ...] = ()
    if kind == "reg":
        size, verity, chunks = head.size, head.verity, _file_chunks(file, layer)
    elif kind == "symlink":
        target = name_bytes(head.link_name)
    elif kind in ("char", "block"):
        rdev = _makedev(head.dev_major, head.dev_minor)
    children: dict[bytes, Node] | None = {} if kind == "dir" else None
    # Every field by position (Node's order): keywords and defaults cost a tenth of the build.
    return Node(kind, head.mode & 0o7777, head.uid, head.gid, size, mtime_ns, rdev, target,
                xattrs, chunks, verity, layer, 0, 1, children, "/")  # fmt: skip


def _set_metadata(node: Node, entry: TocEntry, layer: int) -> None:
    node.mode = entry.mode & 0o7777
    node.uid = entry.uid
    node.gid = entry.gid
    node.mtime_ns = parse_rfc3339_ns(entry.modtime)
    node.xattrs = _xattrs(entry)
    node.layer = layer


def _xattrs(entry: TocEntry) -> dict[bytes, bytes]:
    return {name_bytes(k): v for k, v in entry.xattrs.items()} if entry.xattrs else {}


def _makedev(major: int, minor: int) -> int:
    # The Linux encoding (os.makedev), written out so that huge numbers from a TOC cannot raise.
    return (
        ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12) | ((major & ~0xFFF) << 32)
    )


def _finish(root: Node) -> Tree:
    """Number the inodes depth first (each directory's entries in name order) and set
    ``st_nlink``: a directory's 2 plus its subdirectories, a file's one per name."""
    nodes: dict[int, Node] = {}
    listings: dict[int, tuple[tuple[bytes, Node], ...]] = {}
    names: dict[int, int] = {}  # id(node) -> names of a non-directory
    root.inode = ROOT_INODE
    nodes[ROOT_INODE] = root
    stack = [root]
    while stack:
        directory = stack.pop()
        assert directory.children is not None
        listing = listings[directory.inode] = tuple(sorted(directory.children.items()))
        prefix = directory.path if directory.inode == ROOT_INODE else directory.path + "/"
        subdirs = 0
        for name, child in listing:
            if child.kind == "dir":
                subdirs += 1
            else:
                key = id(child)
                names[key] = names.get(key, 0) + 1
            if child.inode == 0:
                child.inode = len(nodes) + 1
                child.path = prefix + name.decode("utf-8", "replace")
                nodes[child.inode] = child
                if child.kind == "dir":
                    stack.append(child)
        directory.nlink = 2 + subdirs
    for node in nodes.values():
        if node.children is None:
            node.nlink = names[id(node)]
    return Tree(nodes, listings)
