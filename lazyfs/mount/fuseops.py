"""The pyfuse3 front end: a read-only view of the merged tree, content from the resolver.

This is the only module that raises ``pyfuse3.FUSEError``. Handlers are thin; domain errors are
mapped to an errno in one place (``_errno_for``). Metadata comes from the in-memory tree, so
stat, lookup and readdir never touch the network. Every request runs as a trio task on the
event loop (docs/concurrency.md); nothing here blocks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from lazyfs.config import STATS_XATTR
from lazyfs.errors import LazyfsError
from lazyfs.mount.resolver import ChunkResolver
from lazyfs.mount.tree import Node, Tree

log = logging.getLogger(__name__)

# Metadata never changes under a mount: let the kernel cache it for a day.
ATTR_TIMEOUT_S = 86400.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

P = ParamSpec("P")
R = TypeVar("R")


def _errno_for(exc: LazyfsError) -> int:
    """The one place where domain errors become errnos.

    A read that cannot produce verified bytes fails with EIO whatever the cause (bad digest,
    registry down, deadline passed, cache failure); the log names the cause.
    """
    return errno.EIO


def _translated(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except LazyfsError as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(_errno_for(exc)) from exc

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class LazyOperations(pyfuse3.Operations):
    """Read-only FUSE operations over a Tree."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, tree: Tree, resolver: ChunkResolver, stats: Callable[[], dict[str, Any]]
    ) -> None:
        super().__init__()
        self._tree = tree
        self._resolver = resolver
        self._stats = stats
        self._total_bytes = sum(n.size for n in tree.nodes.values())

    def _node(self, inode: int) -> Node:
        node = self._tree.nodes.get(inode)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.inode
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT_S
        attrs.attr_timeout = ATTR_TIMEOUT_S
        attrs.st_mode = node.st_mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = node.rdev
        attrs.st_size = len(node.target) if node.kind == "symlink" else node.size
        attrs.st_blksize = 4096
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = node.mtime_ns
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attributes(self._node(parent_inode))
        child = self._tree.lookup(parent_inode, name)
        if child is None:
            raise _fail(errno.ENOENT)
        return self._attributes(child)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.kind != "symlink":
            raise _fail(errno.EINVAL)
        return node.target

    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self._node(inode).is_dir:
            raise _fail(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self._tree.listings.get(fh, ())
        for index in range(start_id, len(listing)):
            name, child = listing[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(child), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        return await self._resolver.read(node, off, size)

    async def release(self, fh: int) -> None:
        return None

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            return json.dumps(self._stats()).encode()
        value = self._node(inode).xattrs.get(name)
        if value is None:
            raise _fail(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return sorted(self._node(inode).xattrs)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = (self._total_bytes + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._tree.nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise _fail(errno.EROFS)
        return True

    async def forget(self, inode_list: Any) -> None:
        return None  # the tree is static: nothing to free

    # Every write is refused: the image is immutable.
    async def setattr(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def write(self, *args: Any) -> int:
        raise _fail(errno.EROFS)

    async def create(self, *args: Any) -> Any:
        raise _fail(errno.EROFS)

    async def mkdir(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EROFS)

    async def unlink(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def rmdir(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def rename(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def setxattr(self, *args: Any) -> None:
        raise _fail(errno.EROFS)

    async def removexattr(self, *args: Any) -> None:
        raise _fail(errno.EROFS)
