"""The blocking client of the control socket, for the CLI (docs/service.md).

Imports only the standard library and leaves: ``lazyfs mount`` pays for nothing else. Its
socket is ``_socket``'s, the C core of ``socket``: that module's enum and selectors set-up
costs a client start about 4 ms, for nothing a UNIX stream socket needs.
"""

from __future__ import annotations

import _socket
import errno
from pathlib import Path
from typing import Any

from lazyfs.errors import (
    ServiceError,
    ServiceNotListeningError,
    ServiceUnavailableError,
    UsageError,
)
from lazyfs.service.protocol import MAX_MESSAGE_BYTES, decode, encode, request

DEFAULT_TIMEOUT_S = 600.0  # an open fetches metadata over links that may be slow


def call(socket_path: Path, op: str, timeout_s: float = DEFAULT_TIMEOUT_S, **args: Any) -> Any:
    """Send one request; its answer, or the service's error raised as a lazyfs error."""
    answer = _exchange(socket_path, request(op, **args), timeout_s)
    if answer.get("ok") is True:
        return answer
    message = str(answer.get("error") or "the service gave no reason")
    if answer.get("kind") == "usage":
        raise UsageError(message)
    if answer.get("kind") == "unavailable":
        raise ServiceUnavailableError(message)
    raise ServiceError(message)


def _exchange(socket_path: Path, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout_s)
        _connect(conn, socket_path)
        try:
            conn.sendall(encode(message))
            line = _read_line(conn)
        except TimeoutError as exc:
            raise ServiceError(f"the service at {socket_path} did not answer in time") from exc
        except OSError as exc:
            raise ServiceUnavailableError(
                f"lost the connection to the service at {socket_path}: {exc.strerror or exc}"
            ) from exc
    finally:
        conn.close()
    try:
        return decode(line)
    except ValueError as exc:
        raise ServiceError(f"the service at {socket_path} answered garbage") from exc


def _connect(conn: _socket.socket, socket_path: Path) -> None:
    try:
        conn.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ServiceNotListeningError(f"no lazyfs service listens on {socket_path}") from exc
    except PermissionError as exc:  # someone listens, but not for us: no service to start
        raise ServiceError(
            f"cannot open the lazyfs service socket {socket_path}: permission denied "
            "(the service's owner can grant it with `lazyfs serve --socket-group GROUP`)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise ServiceNotListeningError(f"{socket_path} is not a socket") from exc
        raise ServiceNotListeningError(
            f"cannot connect to the lazyfs service at {socket_path}: {exc.strerror or exc}"
        ) from exc


def _read_line(conn: _socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if data.endswith(b"\n") or size > MAX_MESSAGE_BYTES:
            break
    if not chunks:
        raise ServiceUnavailableError("the service closed the connection without answering")
    return b"".join(chunks)


def is_listening(socket_path: Path) -> bool:
    try:
        call(socket_path, "health", timeout_s=5.0)
    except ServiceUnavailableError:
        return False
    return True
