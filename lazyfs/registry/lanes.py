"""Two lanes to every registry: foreground requests, and the background fill below them.

The fill (lazyfs/mount/fill.py) must never make a read wait, on the link least of all. Pausing
its batches when a read misses is not enough: the bytes of the batches already asked for are
on their way, from the server's socket to ours, and a read's answer queues behind them at the
bottleneck and shares it with them (docs/benchmarks.md, "Background fill"). So background
requests (lazyfs/model/traffic.py) get this lane, which holds the fill *on the wire*:

- **their own connections** (RegistryPools keeps a background pool per TLS setup), so a read
  never waits for a connection the fill holds, and their TCP settings stay theirs;
- **a receive window of their own**, clamped (``TCP_WINDOW_CLAMP``) to what keeps the link
  busy and little more: the fill's delivery rate times the connection's least round trip
  (``tcpi_min_rtt``, the path without queues) plus ``TARGET_QUEUE_S``, split over the fill's
  answers being read, never below ``MIN_WINDOW_BYTES`` in all. This is receiver-driven
  less-than-best-effort transport (rLEDBAT, IRTF ICCRG): the sender cannot have more of the
  fill's bytes in flight than the window, so the fill's standing queue at the bottleneck is at
  most ``TARGET_QUEUE_S`` of the link. The estimate only grows while the window binds: the
  window allows ``1 + TARGET_QUEUE_S / min_rtt`` times the rate it was computed from;
- **a receive buffer** (``SO_RCVBUF``) of ``BUFFER_WINDOWS`` windows, raised with the window
  while an answer is read and lowered only once it is whole (a buffer shrunk under bytes
  already in it makes the kernel prune or drop), so the buffers of the fill's connections add
  up to about ``BUFFER_WINDOWS`` times the fill's window.
  Linux's autotuning grows a busy connection's buffer to megabytes (0.5-1.7 MB seen on the
  fill's connections), and while the buffer has room the window stays open whether or not we
  read: the bound is what makes the next point a stop;
- **a stop while any foreground request is open** (from before it is sent until its answer is
  closed, auth and redirects included): a background answer is not read from its socket, and no
  background request is sent, so our receive buffer fills, the window closes and the sender
  stops within about ``BUFFER_WINDOWS`` windows; reading resumes when the last foreground
  request ends, or after ``MAX_PAUSE_S`` (then one chunk is read and the wait starts again), so
  a server never sees a connection stall long enough to drop it.

Event loop only (docs/concurrency.md, "Background fill on the wire"). Socket options are best
effort: a platform without them, or a socket already closed, leaves the window as the kernel
chose it.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import weakref
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import anyio
import httpx

TARGET_QUEUE_S = 0.05  # the fill's standing queue at the bottleneck, at most
MIN_WINDOW_BYTES = 128 << 10  # the fill's window in all, whatever the estimate says
MIN_CONNECTION_WINDOW_BYTES = 16 << 10  # a few segments: below it TCP stalls on delayed ACKs
MAX_CONNECTION_WINDOW_BYTES = 16 << 20
MAX_PAUSE_S = 5.0
BUFFER_WINDOWS = 2  # the receive buffer, in windows: room for a late reader, a short stop
RATE_BIN_S = 0.25
RATE_BINS = 20  # the estimate is the best bin of the last 5 s

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_WINDOW_CLAMP = getattr(socket, "TCP_WINDOW_CLAMP", None)
_TCP_INFO_BYTES = 232
_MIN_RTT_OFFSET = 148  # struct tcp_info.tcpi_min_rtt, in microseconds (Linux >= 4.10)


class DeliveryRate:
    """The background lane's delivered bytes per second: the best ``RATE_BIN_S`` bin of the
    last ``RATE_BINS``. A best bin, because bins the fill spent paused or between batches
    undercount; the window's headroom lets the estimate climb back."""

    def __init__(self) -> None:
        self._bins: deque[tuple[int, int]] = deque(maxlen=RATE_BINS + 1)  # (bin, bytes)

    def add(self, size: int, now_s: float) -> None:
        index = math.floor(now_s / RATE_BIN_S)
        if self._bins and self._bins[-1][0] == index:
            self._bins[-1] = (index, self._bins[-1][1] + size)
        else:
            self._bins.append((index, size))

    def bytes_per_s(self, now_s: float) -> float:
        current = math.floor(now_s / RATE_BIN_S)
        complete = [size for index, size in self._bins if current - RATE_BINS <= index < current]
        return max(complete, default=0) / RATE_BIN_S


def window_bytes(rate_bytes_per_s: float, min_rtt_s: float, answers: int) -> int:
    """The receive window of one of ``answers`` background answers being read."""
    total = max(MIN_WINDOW_BYTES, rate_bytes_per_s * (min_rtt_s + TARGET_QUEUE_S))
    share = int(total / max(1, answers))
    return min(MAX_CONNECTION_WINDOW_BYTES, max(MIN_CONNECTION_WINDOW_BYTES, share))


@dataclass
class LaneStats:
    background_requests: int = 0
    background_bytes: int = 0
    pauses: int = 0  # waits of a background request or answer for the foreground
    paused_s: float = 0.0
    window_bytes: int = 0  # the last receive window set on a background connection

    def to_json(self) -> dict[str, float]:
        return {
            "background_requests": self.background_requests,
            "background_bytes": self.background_bytes,
            "pauses": self.pauses,
            "paused_seconds": round(self.paused_s, 3),
            "window_bytes": self.window_bytes,
        }


class BackgroundLane:
    """Service-wide: the foreground requests open now, and the background answers being read."""

    def __init__(self) -> None:
        self.stats = LaneStats()
        self.rate = DeliveryRate()
        self._foreground = 0
        self._idle: anyio.Event | None = None  # set when the last foreground request ends
        self._answers = 0  # background answers being read
        # The receive buffer set on each background socket (a socket outlives its answers).
        self.buffers: weakref.WeakKeyDictionary[_Socket, int] = weakref.WeakKeyDictionary()

    @property
    def foreground_open(self) -> int:
        return self._foreground

    @asynccontextmanager
    async def foreground(self) -> AsyncIterator[None]:
        """Around a foreground request, from before it is sent until its answer is closed."""
        self._foreground += 1
        if self._foreground == 1:
            self._idle = anyio.Event()
        try:
            yield
        finally:
            self._foreground -= 1
            if self._foreground == 0 and self._idle is not None:
                self._idle.set()

    async def yield_to_foreground(self) -> None:
        """Wait until no foreground request is open, or ``MAX_PAUSE_S``."""
        if not self._foreground:
            return
        self.stats.pauses += 1
        started = anyio.current_time()
        assert self._idle is not None
        with anyio.move_on_after(MAX_PAUSE_S):
            await self._idle.wait()
        self.stats.paused_s += anyio.current_time() - started

    def answer(self, response: httpx.Response) -> httpx.Response:
        """``response``, a background answer, read under this lane's rules."""
        self.stats.background_requests += 1
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_BackgroundBody(self, response),
            extensions=response.extensions,
        )

    def _window(self, sock: _Socket | None) -> int:
        min_rtt_s = _min_rtt_s(sock) if sock is not None else 0.0
        return window_bytes(self.rate.bytes_per_s(anyio.current_time()), min_rtt_s, self._answers)


class _Socket(Protocol):
    """What a connection's socket (a trio or a stdlib socket) offers for this."""

    def getsockopt(self, level: int, option: int, size: int, /) -> bytes: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


class _BackgroundBody(httpx.AsyncByteStream):
    def __init__(self, lane: BackgroundLane, response: httpx.Response) -> None:
        self._lane = lane
        inner = response.stream
        assert isinstance(inner, httpx.AsyncByteStream)  # an async transport's answer
        self._inner: httpx.AsyncByteStream = inner
        self._socket = _socket_of(response)
        self._clamped = 0
        self._counted = False  # counted in the lane's answers being read

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lane = self._lane
        lane._answers += 1
        self._counted = True
        try:
            self._clamp()
            chunks = self._inner.__aiter__()
            while True:
                await lane.yield_to_foreground()  # not read: the window closes, the sender stops
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    self._release_buffer()
                    return
                lane.rate.add(len(chunk), anyio.current_time())
                lane.stats.background_bytes += len(chunk)
                self._clamp()
                yield chunk
        finally:
            self._uncount()

    async def aclose(self) -> None:
        self._uncount()  # a reader that stopped early: the generator may end only at GC
        await self._inner.aclose()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._lane._answers -= 1

    def _clamp(self) -> None:
        if self._socket is None or _TCP_WINDOW_CLAMP is None:
            return
        window = self._lane._window(self._socket)
        if window == self._clamped:
            return
        try:
            self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_WINDOW_CLAMP, window)
            self._bound_buffer(window)
        except OSError:
            self._socket = None  # closed, or not TCP: the kernel's window stands
            return
        self._clamped = self._lane.stats.window_bytes = window

    def _bound_buffer(self, window: int) -> None:
        """A receive buffer of ``BUFFER_WINDOWS`` windows (module docstring), only raised while
        the answer is read, so that no byte already buffered is ever over the bound."""
        assert self._socket is not None
        rcvbuf = self._lane.buffers.get(self._socket, 0)
        if window * BUFFER_WINDOWS > rcvbuf:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window * BUFFER_WINDOWS)
            self._lane.buffers[self._socket] = window * BUFFER_WINDOWS

    def _release_buffer(self) -> None:
        """The answer is whole, so nothing more is on its way on this connection: its buffer
        goes back to the least, and the next answer raises it to its own windows. Kept raised,
        the buffers of connections that once had the whole window would add up, and a stop
        would let that much more in."""
        if self._socket is None or self._socket not in self._lane.buffers:
            return
        least = MIN_CONNECTION_WINDOW_BYTES * BUFFER_WINDOWS
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, least)
            self._lane.buffers[self._socket] = least


def _socket_of(response: httpx.Response) -> _Socket | None:
    stream = response.extensions.get("network_stream")
    get = getattr(stream, "get_extra_info", None)
    if get is None:
        return None
    try:
        sock = get("socket")
    except (KeyError, AttributeError, OSError):  # a backend with no socket to give
        return None
    return sock if hasattr(sock, "setsockopt") and hasattr(sock, "getsockopt") else None


def _min_rtt_s(sock: _Socket) -> float:
    if _TCP_INFO is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except OSError:
        return 0.0
    if len(info) < _MIN_RTT_OFFSET + 4:
        return 0.0
    (min_rtt_us,) = struct.unpack_from("I", info, _MIN_RTT_OFFSET)
    return 0.0 if min_rtt_us == 0xFFFFFFFF else min_rtt_us / 1e6
