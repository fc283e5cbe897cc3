"""The images one FUSE session serves, each a directory under the session's root.

pyfuse3 allows one session per process, so a service that serves many images mounts one file
system: its root lists the open images by name, and each image's merged tree hangs below its
directory. Inode numbers carry the image: ``slot << 32 | inode in the image's tree``. Slots are
never reused within a process, so an inode the kernel still holds for a released image can
never name a node of another one; it just stops resolving (ENOENT).

Event loop only (docs/concurrency.md): FUSE handlers and the service touch the table there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lazyfs.mount.resolver import ChunkResolver
from lazyfs.mount.tree import Node, Tree

SLOT_SHIFT = 32
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
SERVICE_ROOT_INODE = 1  # slot 0: the directory that lists the images
STORE_ROOT_INODE = 2  # slot 0: the additional layer store (mount/layerstore.py), if any
STORE_DIR_NAME = ".layer-store"  # its name in the root; image names are "sha256-<hex>"


@dataclass(frozen=True)
class ServedImage:
    """What the FUSE operations need of one image."""

    name: str  # its directory under the root
    tree: Tree
    resolver: ChunkResolver
    stats: Callable[[], dict[str, Any]]  # what ``lazyfs stats`` shows of it


class ImageTable:
    def __init__(self) -> None:
        self._by_slot: dict[int, ServedImage] = {}
        self._slot_by_name: dict[str, int] = {}
        self._next_slot = 1

    def add(self, image: ServedImage, *, listed: bool = True) -> int:
        """Serve ``image``, under its name in the root if ``listed``; returns its slot. An
        unlisted tree (a layer of the layer store) is reached only through its slot."""
        if image.name in self._slot_by_name:
            raise ValueError(f"an image named {image.name} is already served")
        slot = self._next_slot
        self._next_slot += 1
        self._by_slot[slot] = image
        if listed:
            self._slot_by_name[image.name] = slot
        return slot

    def remove(self, name: str) -> None:
        slot = self._slot_by_name.pop(name, None)
        if slot is not None:
            del self._by_slot[slot]

    def remove_slot(self, slot: int) -> None:
        self._by_slot.pop(slot, None)

    def by_name(self, name: str) -> tuple[int, ServedImage] | None:
        slot = self._slot_by_name.get(name)
        return None if slot is None else (slot, self._by_slot[slot])

    def by_slot(self, slot: int) -> ServedImage | None:
        return self._by_slot.get(slot)

    def names(self) -> list[tuple[str, int]]:
        """(name, slot) of every image, sorted by name: the root's listing."""
        return sorted(self._slot_by_name.items())

    def __iter__(self) -> Iterator[ServedImage]:
        return iter(list(self._by_slot.values()))

    def __len__(self) -> int:
        return len(self._slot_by_name)

    def resolve(self, inode: int) -> tuple[int, ServedImage, Node] | None:
        """The slot, image and node of a global inode that names a node of an image."""
        image = self._by_slot.get(inode >> SLOT_SHIFT)
        if image is None:
            return None
        node = image.tree.nodes.get(inode & LOCAL_MASK)
        return None if node is None else (inode >> SLOT_SHIFT, image, node)


def global_inode(slot: int, node: Node) -> int:
    return slot << SLOT_SHIFT | node.inode
