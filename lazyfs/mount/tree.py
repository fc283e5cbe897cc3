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


@dataclass(eq=False)
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
    root = Node(kind="dir", mode=0o755, children={})
    for index, entries in enumerate(layers):
        try:
            _apply_layer(root, index, list(entries))
        except TocError as exc:  # name the layer: the image may have many
            raise TocError(f"layer {index}: {exc}") from exc
    return _finish(root)


def build_layer_tree(entries: Iterable[TocEntry], layer: int) -> Tree:
    """One layer's own tree, whiteouts in overlayfs form; chunks refer to layer ``layer``."""
    root = Node(kind="dir", mode=0o755, children={})
    try:
        opaque = _add_layer_entries(root, layer, list(entries))
    except TocError as exc:
        raise TocError(f"layer {layer}: {exc}") from exc
    for node in _all_nodes(root):
        for name in [n for n in node.xattrs if n.startswith(OVERLAY_XATTR_PREFIX)]:
            del node.xattrs[name]
    for directory in opaque:  # after the metadata: a directory's entry may follow its marker
        directory.xattrs[OVERLAY_OPAQUE_XATTR] = b"y"
    return _finish(root)


def _add_layer_entries(root: Node, layer: int, entries: list[TocEntry]) -> list[Node]:
    """Add a layer's entries as they are; returns the directories marked opaque."""
    opaque: list[Node] = []
    deferred: list[tuple[list[bytes], list[TocEntry]]] = []
    for group in group_file_entries(tuple(entries)):
        parts = _split(group[0].name)
        if parts and parts[-1] == OPAQUE_MARKER.encode():
            opaque.append(_ensure_dir(root, parts[:-1], layer))
        elif parts and parts[-1].startswith(_WHITEOUT_PREFIX_BYTES):
            _add_whiteout_device(root, layer, parts, group[0])
        elif group[0].type == "hardlink" and _hardlink_target(root, group[0]) is None:
            deferred.append((parts, group))
        else:
            _add_entry(root, layer, parts, group)
    for parts, group in deferred:
        _add_entry(root, layer, parts, group)
    return opaque


def _add_whiteout_device(root: Node, layer: int, parts: list[bytes], entry: TocEntry) -> None:
    name = parts[-1][len(_WHITEOUT_PREFIX_BYTES) :]
    if not name:
        raise TocError(f"whiteout {entry.name!r} names nothing")
    parent = _ensure_dir(root, parts[:-1], layer)
    assert parent.children is not None
    whiteout = Node(kind="char", mode=0, layer=layer, rdev=0)
    whiteout.mtime_ns = parse_rfc3339_ns(entry.modtime)
    parent.children[name] = whiteout


def _all_nodes(root: Node) -> Iterator[Node]:
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if node.children:
            stack.extend(child for child in node.children.values() if child.is_dir)
            yield from (child for child in node.children.values() if not child.is_dir)


def _apply_layer(root: Node, layer: int, entries: list[TocEntry]) -> None:
    groups = [(_split(group[0].name), group) for group in group_file_entries(tuple(entries))]
    for parts, _ in groups:
        _apply_whiteout(root, parts)
    deferred: list[tuple[list[bytes], list[TocEntry]]] = []  # hardlinks before their target
    for parts, group in groups:
        if parts and parts[-1].startswith(_WHITEOUT_PREFIX_BYTES):
            continue
        if group[0].type == "hardlink" and _hardlink_target(root, group[0]) is None:
            deferred.append((parts, group))
            continue
        _add_entry(root, layer, parts, group)
    for parts, group in deferred:
        _add_entry(root, layer, parts, group)


def _split(name: str) -> list[bytes]:
    clean = posixpath.normpath("/" + name).lstrip("/")
    try:  # the whole name at once: the common case, and several times faster
        parts = clean.encode("utf-8", "surrogateescape").split(b"/")
    except UnicodeEncodeError:
        parts = [name_bytes(part) for part in clean.split("/")]
    return [part for part in parts if part and part != b"."]


def _apply_whiteout(root: Node, parts: list[bytes]) -> None:
    if not parts or not parts[-1].startswith(WHITEOUT_PREFIX.encode()):
        return
    parent = _find_dir(root, parts[:-1])
    if parent is None or parent.children is None:
        return
    if parts[-1] == OPAQUE_MARKER.encode():
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


def _ensure_dir(root: Node, parts: list[bytes], layer: int) -> Node:
    """The directory at ``parts``, created (0755, root-owned) where a layer left it implicit."""
    node = root
    for part in parts:
        assert node.children is not None
        child = node.children.get(part)
        if child is None or not child.is_dir:
            child = Node(kind="dir", mode=0o755, layer=layer, children={})
            node.children[part] = child
        node = child
    return node


def _add_entry(root: Node, layer: int, parts: list[bytes], group: list[TocEntry]) -> None:
    head = group[0]
    if not parts:  # the root directory's own metadata
        _set_metadata(root, head, layer)
        return
    parent = _ensure_dir(root, parts[:-1], layer)
    assert parent.children is not None
    if head.type == "hardlink":
        target = _resolve_hardlink(root, head)
        parent.children[parts[-1]] = target
        return
    existing = parent.children.get(parts[-1])
    if head.type == "dir" and existing is not None and existing.is_dir:
        _set_metadata(existing, head, layer)
        return
    parent.children[parts[-1]] = _new_node(head, group, layer)


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


def _new_node(head: TocEntry, group: list[TocEntry], layer: int) -> Node:
    if head.type not in _KIND_BITS:
        raise TocError(f"TOC entry {head.name!r} has unexpected type {head.type!r}")
    node = Node(kind=head.type, mode=0, children={} if head.type == "dir" else None)
    _set_metadata(node, head, layer)
    if head.type == "reg":
        node.size = head.size
        node.verity = head.verity
        node.chunks = tuple(LayerChunk(layer, ref) for ref in file_chunks(group))
    elif head.type == "symlink":
        node.target = name_bytes(head.link_name)
    elif head.type in ("char", "block"):
        node.rdev = _makedev(head.dev_major, head.dev_minor)
    return node


def _set_metadata(node: Node, entry: TocEntry, layer: int) -> None:
    node.mode = entry.mode & 0o7777
    node.uid = entry.uid
    node.gid = entry.gid
    node.mtime_ns = parse_rfc3339_ns(entry.modtime)
    node.xattrs = {name_bytes(k): v for k, v in entry.xattrs.items()} if entry.xattrs else {}
    node.layer = layer


def _makedev(major: int, minor: int) -> int:
    # The Linux encoding (os.makedev), written out so that huge numbers from a TOC cannot raise.
    return (
        ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & ~0xFF) << 12) | ((major & ~0xFFF) << 32)
    )


def _finish(root: Node) -> Tree:
    nodes: dict[int, Node] = {}
    listings: dict[int, tuple[tuple[bytes, Node], ...]] = {}
    names: dict[int, int] = {}  # id(node) -> number of names, for st_nlink
    _number(root, nodes, names, listings)
    for node in nodes.values():
        if node.children is not None:
            node.nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)
        else:
            node.nlink = names[id(node)]
    return Tree(nodes, listings)


def _number(
    root: Node,
    nodes: dict[int, Node],
    names: dict[int, int],
    listings: dict[int, tuple[tuple[bytes, Node], ...]],
) -> None:
    root.inode = ROOT_INODE
    nodes[ROOT_INODE] = root
    stack = [root]
    while stack:
        directory = stack.pop()
        assert directory.children is not None
        listing = listings[directory.inode] = tuple(sorted(directory.children.items()))
        for name, child in listing:
            names[id(child)] = names.get(id(child), 0) + 1
            if child.inode == 0:
                child.inode = len(nodes) + 1
                child.path = posixpath.join(directory.path, name.decode("utf-8", "replace"))
                nodes[child.inode] = child
                if child.is_dir:
                    stack.append(child)
