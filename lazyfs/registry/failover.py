"""Endpoint failover: one mechanism for metadata and blob reads.

A call goes to each endpoint of a reference in order (mirrors first, then the origin, as
EndpointOrder ranks them) until one answers; an endpoint that fails is put last for a while, so
a dead mirror costs one timeout rather than one per request. The last endpoint's error is the
one reported.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from lazyfs.errors import RegistryError
from lazyfs.model.reference import Reference
from lazyfs.registry.mirrors import EndpointOrder

log = logging.getLogger(__name__)
T = TypeVar("T")


class Failover:
    def __init__(self, order: EndpointOrder | None = None) -> None:
        self.order = order or EndpointOrder()

    async def first(self, ref: Reference, call: Callable[[Reference], Awaitable[T]]) -> T:
        """``call`` on the first endpoint of ``ref`` that answers."""
        *alternatives, last = self.order(ref)
        for endpoint in alternatives:
            try:
                return await call(endpoint)
            except RegistryError as exc:
                self.order.failed(endpoint)
                log.warning("%s failed (%s); trying the next endpoint", endpoint.registry, exc)
        return await call(last)
