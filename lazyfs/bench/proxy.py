"""The delay proxy of the link emulator: a TCP forwarder that holds every segment RTT/2 each way.

Runs as its own process (``python -m lazyfs.bench.proxy``), started by :mod:`lazyfs.bench.links`.
Its listening sockets live in the bench's network namespace (created there with ``setns``), its
upstream connections in the caller's namespace, so every byte between a client and the registry
crosses the veth pair, and its token-bucket shaper, exactly once each way.

Per connection and direction, one thread reads and stamps each segment with its release time
(arrival + RTT/2) and one thread sends it when that time comes; the bytes held are bounded, so
a fast sender is slowed down instead of filling memory. The first client segment is also held
one extra RTT, the TCP handshake a real link would have cost.

The proxy counts what crosses it (bytes each way, connections) and sniffs the client's HTTP
request heads (requests, blob requests, ``Range`` requests): counts that do not depend on what
the client says about itself. It is driven by lines on stdin (``rtt SECONDS``, ``stats``,
``quit``) and exits when stdin closes, so it never outlives the bench.

A probe service (``echo`` and ``bulk N``) behind its own listener lets the bench measure the RTT
and throughput the emulated link really achieves.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

CLONE_NEWNET = 0x40000000
PR_SET_TIMERSLACK = 29
RECV_BYTES = 256 << 10
MIN_HELD_BYTES = 4 << 20
MAX_CONNECTIONS = 512
MAX_ACCEPTS = 1_000_000
MAX_HEAD_BYTES = 64 << 10
WAIT_SLICE_S = 0.5
PROBE_BLOCK = b"\0" * (256 << 10)
PROBE = "probe"


@dataclass
class Counters:
    """What crossed one listener (payload bytes, as TCP carried them)."""

    bytes_down: int = 0
    bytes_up: int = 0
    connections: int = 0
    requests: int = 0
    blob_requests: int = 0
    range_requests: int = 0


class Link:
    """The settings all connections read, and the counters they add to."""

    def __init__(self, rtt_s: float, hold_bytes: int) -> None:
        self.lock = threading.Lock()
        self.rtt_s = rtt_s
        self.hold_bytes = hold_bytes
        self.counters: dict[str, Counters] = {}
        self.live = 0

    def one_way_s(self) -> float:
        with self.lock:
            return self.rtt_s / 2

    def add(self, route: str, **deltas: int) -> None:
        with self.lock:
            counters = self.counters.setdefault(route, Counters())
            for name, delta in deltas.items():
                setattr(counters, name, getattr(counters, name) + delta)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {route: asdict(c) for route, c in self.counters.items()}


class RequestSniffer:
    """Counts HTTP/1.1 request heads in a client's byte stream; gives up on anything odd."""

    def __init__(self, on_request: Callable[[str, str, bool], None]) -> None:
        self._on_request = on_request
        self._buffer = b""
        self._skip = 0
        self.enabled = True

    def feed(self, data: bytes) -> None:
        if not self.enabled:
            return
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buffer += data
        for _ in range(1000):  # bounded: a segment never holds more request heads than this
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            self._parse(head)
            if not self.enabled or self._skip:
                self._discard_body()
        if len(self._buffer) > MAX_HEAD_BYTES:
            self.enabled = False

    def _discard_body(self) -> None:
        taken = min(self._skip, len(self._buffer))
        self._skip -= taken
        self._buffer = self._buffer[taken:]

    def _parse(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.enabled = False
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", ""):
            self.enabled = False  # uploads never cross the link; stop rather than guess
        self._skip = int(headers.get("content-length", "0") or 0)
        self._on_request(parts[0], parts[1], "range" in headers)


class Pipe:
    """One direction of one connection: stamp segments on arrival, send them when due."""

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        link: Link,
        on_data: Callable[[bytes], None],
        not_before: float = 0.0,
    ) -> None:
        self._src, self._dst, self._link = src, dst, link
        self._on_data = on_data
        self._not_before = not_before
        self._queue: deque[tuple[float, bytes]] = deque()
        self._held = 0
        self._eof = False
        self.broken = False
        self._cond = threading.Condition()

    def start(self, on_done: Callable[[], None]) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._guard, args=(self._read_loop, on_done), daemon=True),
            threading.Thread(target=self._guard, args=(self._write_loop, on_done), daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads

    def _guard(self, loop: Callable[[], None], on_done: Callable[[], None]) -> None:
        try:
            loop()
        except OSError:
            self.break_off()
        finally:
            on_done()

    def break_off(self) -> None:
        with self._cond:
            self.broken = True
            self._cond.notify_all()

    def _read_loop(self) -> None:
        while not self.broken:
            data = self._src.recv(RECV_BYTES)
            now = time.monotonic()
            if not data:
                break
            self._on_data(data)
            release = max(now, self._not_before) + self._link.one_way_s()
            self._hold(release, data)
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _hold(self, release: float, data: bytes) -> None:
        with self._cond:
            while self._held >= self._link.hold_bytes and not self.broken:
                self._cond.wait(WAIT_SLICE_S)
            self._queue.append((release, data))
            self._held += len(data)
            self._cond.notify_all()

    def _write_loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                break
            release, data = item
            delay = release - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._dst.sendall(data)
            with self._cond:
                self._held -= len(data)
                self._cond.notify_all()
        if not self.broken:
            self._dst.shutdown(socket.SHUT_WR)

    def _next(self) -> tuple[float, bytes] | None:
        with self._cond:
            while not self._queue and not self._eof and not self.broken:
                self._cond.wait(WAIT_SLICE_S)
            if self.broken or not self._queue:
                return None
            return self._queue.popleft()


class Connection:
    """A client connection and its upstream, with a pipe each way."""

    def __init__(self, client: socket.socket, upstream: socket.socket, route: str, link: Link):
        self._client, self._upstream, self._route, self._link = client, upstream, route, link
        self._sniffer = RequestSniffer(self._count_request)
        accepted = time.monotonic()
        self._up = Pipe(client, upstream, link, self._count_up, accepted + link.rtt_s)
        self._down = Pipe(upstream, client, link, self._count_down)
        self._running = 4
        self._lock = threading.Lock()

    def start(self) -> None:
        self._up.start(self._thread_done)
        self._down.start(self._thread_done)

    def _count_up(self, data: bytes) -> None:
        self._link.add(self._route, bytes_up=len(data))
        self._sniffer.feed(data)

    def _count_down(self, data: bytes) -> None:
        self._link.add(self._route, bytes_down=len(data))

    def _count_request(self, method: str, path: str, ranged: bool) -> None:
        blob = "/blobs/" in path and method == "GET"
        self._link.add(
            self._route, requests=1, blob_requests=int(blob), range_requests=int(blob and ranged)
        )

    def _thread_done(self) -> None:
        if self._up.broken or self._down.broken:
            self._up.break_off()
            self._down.break_off()
            _shutdown(self._client)
            _shutdown(self._upstream)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._client.close()
            self._upstream.close()
            with self._link.lock:
                self._link.live -= 1


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve_route(listener: socket.socket, upstream: tuple[str, int], route: str, link: Link) -> None:
    """Accept connections (a daemon thread; the process ends when stdin closes)."""
    for _ in range(MAX_ACCEPTS):
        client, _ = listener.accept()
        with link.lock:
            full = link.live >= MAX_CONNECTIONS
            link.live += 0 if full else 1
        if full:
            client.close()
            continue
        try:
            remote = socket.create_connection(upstream, timeout=10)
        except OSError:
            client.close()
            with link.lock:
                link.live -= 1
            continue
        remote.settimeout(None)
        link.add(route, connections=1)
        Connection(_nodelay(client), _nodelay(remote), route, link).start()


def serve_probe(listener: socket.socket) -> None:
    """``echo``: send back whatever arrives; ``bulk N``: send N bytes and close."""
    for _ in range(MAX_ACCEPTS):
        conn, _ = listener.accept()
        threading.Thread(target=_probe_session, args=(_nodelay(conn),), daemon=True).start()


def _probe_session(conn: socket.socket) -> None:
    with conn:
        try:
            command = _read_line(conn)
            if command == "echo":
                _echo(conn)
            elif command.startswith("bulk "):
                _bulk(conn, int(command.split()[1]))
        except (OSError, ValueError):
            return


def _read_line(conn: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line.decode().strip()


def _echo(conn: socket.socket) -> None:
    for _ in range(1_000_000):
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def _bulk(conn: socket.socket, size: int) -> None:
    left = size
    while left > 0:
        block = PROBE_BLOCK[: min(left, len(PROBE_BLOCK))]
        conn.sendall(block)
        left -= len(block)
    conn.shutdown(socket.SHUT_WR)


def listen_in_netns(netns: str | None, address: tuple[str, int]) -> socket.socket:
    """A listening socket created inside network namespace ``netns`` (None: this one)."""
    if netns is None:
        return _listener(address)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(libc, target)
        try:
            return _listener(address)
        finally:
            _setns(libc, own)
    finally:
        os.close(own)
        os.close(target)


def _setns(libc: ctypes.CDLL, fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _listener(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def _precise_timers() -> None:
    """1 ns timer slack: sleeps of a fraction of a millisecond end on time."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    sys.setswitchinterval(0.0005)


def _parse_route(text: str) -> tuple[str, tuple[str, int], str]:
    """``NAME=LISTEN_HOST:PORT=UPSTREAM_HOST:PORT`` (upstream ``probe``: the probe service)."""
    name, listen, upstream = text.split("=")
    host, _, port = listen.rpartition(":")
    return name, (host, int(port)), upstream


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _control_loop(link: Link) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "rtt":
            with link.lock:
                link.rtt_s = float(words[1])
                link.hold_bytes = max(MIN_HELD_BYTES, int(words[2]) if len(words) > 2 else 0)
            _answer({"ok": True})
        elif words[0] == "stats":
            _answer(link.snapshot())
        elif words[0] == "quit":
            _answer({"ok": True})
            return
        else:
            _answer({"error": f"unknown command {words[0]!r}"})


def _answer(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lazyfs.bench.proxy")
    parser.add_argument("--netns", help="network namespace to listen in (default: this one)")
    parser.add_argument("--route", action="append", required=True, type=_parse_route)
    parser.add_argument("--rtt", type=float, default=0.0)
    args = parser.parse_args(argv)
    _precise_timers()
    link = Link(args.rtt, MIN_HELD_BYTES)
    probe = _listener(("127.0.0.1", 0))
    threading.Thread(target=serve_probe, args=(probe,), daemon=True).start()
    probe_address: tuple[str, int] = probe.getsockname()
    for name, listen, upstream in args.route:
        listener = listen_in_netns(args.netns, listen)
        target = probe_address if upstream == PROBE else _hostport(upstream)
        threading.Thread(
            target=serve_route, args=(listener, target, name, link), daemon=True
        ).start()
    _answer({"ready": True})
    try:
        _control_loop(link)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the bench cleans up
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
