"""A small forwarding HTTP proxy on loopback, threaded, that counts what it forwards.

It speaks what HTTP_PROXY and HTTPS_PROXY clients send: absolute-form requests
(``GET http://host:port/path``), forwarded with their bodies and answered with the upstream's
status, headers and body; and ``CONNECT host:port``, a byte tunnel (HTTPS end to end). Like a
site's dfdaemon, it resolves names itself: ``hosts`` maps a name (say ``registry.lazyfs.test``)
to where it really listens, so a registry can be named what only the proxy can reach.
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding"}
)


class ForwardProxy:
    """``with ForwardProxy(hosts) as proxy:`` ... ``proxy.url``, ``proxy.requests``."""

    def __init__(self, hosts: Mapping[str, str] | None = None) -> None:
        self.hosts = dict(hosts or {})
        self.requests: Counter[str] = Counter()  # "GET host:port", "CONNECT host:port"
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def count(self, kind: str) -> None:
        with self._lock:
            self.requests[kind] += 1

    def upstream(self, host_port: str) -> tuple[str, int]:
        host, _, port = host_port.rpartition(":")
        target = self.hosts.get(host, host)
        return target, int(port)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: ForwardProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_CONNECT(self) -> None:
            proxy.count(f"CONNECT {self.path}")
            try:
                upstream = socket.create_connection(proxy.upstream(self.path), timeout=10)
            except OSError:
                self.send_error(502)
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            _pump(self.connection, upstream)
            self.close_connection = True

        def _forward(self) -> None:
            parts = urlsplit(self.path)
            if parts.scheme != "http" or not parts.netloc:
                self.send_error(400, "absolute-form http URL expected")
                return
            netloc = parts.netloc if ":" in parts.netloc else f"{parts.netloc}:80"
            proxy.count(f"{self.command} {netloc}")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            host, port = proxy.upstream(netloc)
            target = http.client.HTTPConnection(host, port, timeout=30)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            try:
                target.request(self.command, path or "/", body=body, headers=headers)
                answer = target.getresponse()
                data = answer.read()
            except OSError:
                self.send_error(502)
                return
            finally:
                target.close()
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    return Handler


def _pump(client: socket.socket, upstream: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with upstream:
        sockets = [client, upstream]
        while True:
            readable, _, _ = select.select(sockets, [], [], 30)
            if not readable:
                return
            for source in readable:
                data = source.recv(1 << 16)
                if not data:
                    return
                (upstream if source is client else client).sendall(data)
