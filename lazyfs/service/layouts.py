"""The OCI layouts the service answers for (``lazyfs mount oci:PATH``), by registry host name.

An open request for a layout registers it under its host (registry/layoutregistry.py), and the
registry clients read through it. It is kept while something may still read through that host:
an open of it under way, an open image whose reference is on it, or a recently released image
on it that a new mount of the same manifest would reuse (the reused image keeps the reference,
so the host, it was opened from). :meth:`ServedLayouts.prune` drops the rest; without it, every
layout ever mounted, or tried, would stay for the service's lifetime.

Event loop only (docs/concurrency.md).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

from lazyfs.registry.layoutregistry import LayoutRegistry


class ServedLayouts:
    def __init__(self) -> None:
        # Handed to the registry clients, which look each request's host up in it.
        self.by_host: dict[str, LayoutRegistry] = {}
        self._opening: Counter[str] = Counter()

    @contextlib.contextmanager
    def opening(self, host: str, served: LayoutRegistry) -> Iterator[None]:
        """Serve ``served`` under ``host``, and keep it while the block (an open) runs."""
        self.by_host[host] = served
        self._opening[host] += 1
        try:
            yield
        finally:
            self._opening[host] -= 1
            if self._opening[host] <= 0:
                del self._opening[host]

    def prune(self, used_hosts: Iterable[str]) -> list[LayoutRegistry]:
        """Drop the layouts whose host is neither in ``used_hosts`` nor being opened; those
        dropped."""
        keep = set(used_hosts) | set(self._opening)
        dropped = [host for host in self.by_host if host not in keep]
        return [self.by_host.pop(host) for host in dropped]
