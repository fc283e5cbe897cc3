"""The control protocol: one JSON object per line over a UNIX stream socket (docs/service.md).

A client sends one request and reads one answer on a connection. Every request carries
``"version": PROTOCOL_VERSION`` and an ``"op"``; every answer ``"ok"``, and on failure an
``"error"`` (one line) and its ``"kind"`` (``usage`` for a bad request, exit status 2; ``error``
otherwise). Light: the CLI imports it.
"""

from __future__ import annotations

import json
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
# A request may carry an access profile; 64 MiB is far more than any profile needs.
MAX_MESSAGE_BYTES: Final = 64 << 20
OPS: Final = frozenset({"open", "release", "list", "stats", "health", "shutdown"})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """A message; ValueError if it is not one JSON object."""
    document = json.loads(line)
    if not isinstance(document, dict):
        raise ValueError("a message must be a JSON object")
    return document


def request(op: str, **arguments: Any) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "op": op, **arguments}


def failure(message: str, kind: str = "error") -> dict[str, Any]:
    return {"ok": False, "error": message.replace("\n", " "), "kind": kind}
