"""The control socket: a UNIX stream socket answering one request per connection.

Mode 0600 by default (0660 with ``--socket-group``): whoever cannot open it cannot open images.
Every request is read whole (bounded), checked, and answered with one line; nothing a client
sends can end the service: a bad request gets an error answer, a bug an "internal error" one.
The protocol is in protocol.py and docs/service.md.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream

from lazyfs.errors import LazyfsError, ServiceError, ServiceUnavailableError, UsageError
from lazyfs.service import client
from lazyfs.service.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode, failure
from lazyfs.service.service import Peer, Service, socket_mode

log = logging.getLogger(__name__)

_REQUEST_READ_TIMEOUT_S = 30.0


async def serve_control(service: Service, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """Listen on the service's socket until cancelled."""
    path = service.paths.socket
    mode, group = socket_mode(service.config.socket_group)
    await anyio.to_thread.run_sync(_clear_stale_socket, path)
    listener = await anyio.create_unix_listener(path)
    try:
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
        task_status.started()
        await listener.serve(lambda stream: _handle(service, stream))
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()
        _remove(path)


def _clear_stale_socket(path: Path) -> None:
    """A socket file nobody answers on is left from a dead service; a live one is an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {path.parent}: {exc.strerror}") from exc
    if not path.exists() and not path.is_symlink():
        return
    if client.is_listening(path):
        raise ServiceError(f"another lazyfs service already listens on {path}")
    _remove(path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


async def _handle(service: Service, stream: SocketStream) -> None:
    async with stream:
        try:
            peer = _peer(stream)
            with anyio.fail_after(_REQUEST_READ_TIMEOUT_S):
                line = await _read_line(stream)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            log.info("control connection dropped: %r", exc)
            return
        except UsageError as exc:
            answer = failure(str(exc), "usage")
        else:
            answer = await _contained_answer(service, line, peer)
        try:
            await stream.send(encode(answer))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            log.info("the client left before its answer")


async def _contained_answer(service: Service, line: bytes, peer: Peer) -> dict[str, Any]:
    try:
        return await _answer(service, line, peer)
    except Exception:
        log.exception("control request crashed")
        return failure("internal error in the lazyfs service; see its log")


async def _answer(service: Service, line: bytes, peer: Peer) -> dict[str, Any]:
    try:
        request = decode(line)
    except ValueError:
        return failure("the request is not a JSON object", "usage")
    if request.get("version") != PROTOCOL_VERSION:
        return failure(
            f"protocol version {request.get('version')!r} is not {PROTOCOL_VERSION}: "
            "the client and the service are from different lazyfs versions",
            "usage",
        )
    try:
        return {"ok": True, **await _dispatch(service, request, peer)}
    except UsageError as exc:
        return failure(str(exc), "usage")
    except ServiceUnavailableError as exc:
        return failure(str(exc), "unavailable")
    except LazyfsError as exc:
        return failure(str(exc))


async def _dispatch(service: Service, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
    op = request.get("op")
    if op == "health":
        return service.health()
    if op == "list":
        return service.list_mounts()
    if op == "stats":
        mountpoint = request.get("mountpoint")
        if mountpoint:
            return service.image_stats(Path(os.path.normpath(str(mountpoint))))
        return service.stats()
    if op == "open":
        result: dict[str, Any] = await service.open(request, peer)
        return result
    if op == "release":
        released: dict[str, Any] = await service.release(request, peer)
        return released
    if op == "shutdown":
        if peer.uid not in (0, os.geteuid()):
            raise UsageError("only root or the service's owner may stop it")
        await service.shutdown(restore_later=bool(request.get("restore_later", False)))
        return {}
    raise UsageError(f"unknown operation {op!r}")


async def _read_line(stream: SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        data += await stream.receive(1 << 16)
        if len(data) > MAX_MESSAGE_BYTES:
            raise UsageError(f"request larger than {MAX_MESSAGE_BYTES} bytes")
    return data


def _peer(stream: SocketStream) -> Peer:
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)
