"""The traffic class of the running task: foreground (a read may wait on it) or background.

The background fill (lazyfs/mount/fill.py) runs under :func:`background_traffic`; the registry
layer (lazyfs/registry/lanes.py) sends such requests on connections of their own and holds
them while any foreground request is on the wire. A context variable, because the class must
reach the network layer through the resolver and the byte-source protocol, which know nothing
of it: tasks started inside the block inherit it (trio and asyncio copy the context of the
task that starts them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_background: ContextVar[bool] = ContextVar("lazyfs_background_traffic", default=False)


@contextmanager
def background_traffic() -> Iterator[None]:
    """Requests made in this block, and by tasks it starts, are background traffic."""
    token = _background.set(True)
    try:
        yield
    finally:
        _background.reset(token)


def is_background() -> bool:
    return _background.get()
