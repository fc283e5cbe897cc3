"""A small fault-injecting registry for tests: a threaded ``http.server`` on 127.0.0.1.

It speaks enough of the distribution API (blobs with Range, manifests, uploads) plus a bearer
token realm at ``/token``, and can be told to misbehave: fail N times, truncate bodies, ignore
Range, coalesce ranges into one part, delay, demand Basic or Bearer auth, redirect blob GETs to
another origin (``localhost`` instead of ``127.0.0.1``); answer several ranges with 416 or the
whole blob, send a wrong Content-Range, stall or trickle a body. Every request is recorded.
``FaultServer(bind=...)`` listens on another loopback address (or one inside a network
namespace the test made): tests send traffic nowhere else. ``FaultServer(tls=context)`` speaks
HTTPS with that server context.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import parse_qs, urlsplit

_RANGE_RE = re.compile(r"(\d+)-(\d+)")
_BLOB_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")
_UPLOADS_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/uploads/$")
_UPLOAD_RE = re.compile(r"^/upload/(?P<repo>.+)/(?P<id>\d+)$")
_STORAGE_RE = re.compile(r"^/storage/(?P<digest>sha256:[a-f0-9]{64})$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Faults:
    """What to break; counters count down as faults fire."""

    fail_times: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    truncate_times: int = 0
    ignore_range: bool = False
    coalesce_ranges: bool = False
    delay_s: float = 0.0
    basic_auth: tuple[str, str] | None = None
    bearer: bool = False
    # The realm's own credentials (Basic on /token); None: anonymous tokens.
    realm_auth: tuple[str, str] | None = None
    token_lifetime_s: int | None = 60
    token_field: str = "token"
    redirect_blobs: bool = False
    manifest_content_type: str | None = None
    manifest_digest_header: str | None = None
    # Several ranges in one request get this status instead of multipart: 416, or 200 (the
    # whole blob); None serves them.
    multi_range_status: int | None = None
    # Added to the start (and end) that a single-part 206's Content-Range claims; or the
    # whole Content-Range value to send instead ("": none at all).
    content_range_shift: int = 0
    content_range_override: str | None = None
    # Blob bodies: after this many bytes, the next stall_times bodies stop for stall_s (or
    # until the server shuts down); with trickle_interval_s, the rest then comes one byte at a
    # time at that interval instead.
    stall_after_bytes: int = 0
    stall_times: int = 0
    stall_s: float = 30.0
    trickle_interval_s: float | None = None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    status: int


@dataclass
class _Token:
    grants: dict[str, set[str]]
    expires_at: float


@dataclass
class _State:
    faults: Faults = field(default_factory=Faults)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    uploads: dict[str, bytearray] = field(default_factory=dict)
    tokens: dict[str, _Token] = field(default_factory=dict)
    token_requests: list[dict[str, list[str]]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    closing: threading.Event = field(default_factory=threading.Event)  # wakes stalled bodies
    scheme: str = "http"  # of the token realm and redirects: "https" when serving TLS
    # The hosts the token realm and redirects name (test_proxy.py names ones only a proxy knows).
    realm_host: str = "127.0.0.1"
    redirect_host: str = "localhost"


class FaultServer:
    """Context manager running the server in a thread on 127.0.0.1:<free port>."""

    def __init__(self, bind: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.state = _State(scheme="http" if tls is None else "https")
        self._bind = bind
        handler = type("_BoundHandler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer((bind, 0), handler)
        if tls is not None:  # HTTPS; a failed handshake drops that connection (an OSError)
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        # A short poll interval keeps shutdown (and so each test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"{self._bind}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def requests(self) -> list[Recorded]:
        return list(self.state.requests)

    @property
    def token_requests(self) -> list[dict[str, list[str]]]:
        return list(self.state.token_requests)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.state.closing.set()
        self._server.shutdown()
        self._server.server_close()

    def add_blob(self, data: bytes, digest: str | None = None) -> str:
        """Serve ``data`` as a blob (under ``digest`` if given, e.g. to serve wrong bytes)."""
        digest = digest or sha256_digest(data)
        self.state.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, tag: str, media_type: str, data: bytes) -> str:
        digest = sha256_digest(data)
        self.state.manifests[(repo, tag)] = (media_type, data)
        self.state.manifests[(repo, digest)] = (media_type, data)
        return digest

    def revoke_tokens(self) -> None:
        self.state.tokens.clear()

    def count(self, method: str, path_prefix: str = "", status: int | None = None) -> int:
        return sum(
            1
            for r in self.state.requests
            if r.method == method
            and r.path.startswith(path_prefix)
            and (status is None or r.status == status)
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest output should not fill with access lines."""

    # ---------------------------------------------------------------- dispatch

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._body = self._read_body()
        self._status = 0
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        # Record before answering: a client may look at the log as soon as it has the answer.
        self._recorded = Recorded(self.command, url.path, dict(self.headers.items()), 0)
        self.state.requests.append(self._recorded)
        self._route(url.path)

    def _route(self, path: str) -> None:
        faults = self.state.faults
        if faults.delay_s:
            time.sleep(faults.delay_s)
        if path == "/token":
            return self._token()
        if match := _STORAGE_RE.match(path):
            return self._blob(match["digest"], allow_redirect=False)
        if not self._authorized(path) or self._injected_failure():
            return None
        return self._registry(path)

    def _registry(self, path: str) -> None:
        if path == "/v2/":
            return self._json(200, {})
        if match := _UPLOADS_RE.match(path):
            return self._start_upload(match["repo"])
        if match := _UPLOAD_RE.match(path):
            return self._upload(match["repo"], match["id"])
        if match := _BLOB_RE.match(path):
            return self._blob(match["digest"], allow_redirect=True)
        if match := _MANIFEST_RE.match(path):
            return self._manifest(match["repo"], match["ref"])
        return self._error(404, "NAME_UNKNOWN", "repository name not known to registry")

    # ------------------------------------------------------------------- auth

    def _authorized(self, path: str) -> bool:
        faults = self.state.faults
        given = self.headers.get("Authorization", "")
        if faults.basic_auth is not None and given != _basic(*faults.basic_auth):
            self._error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="fault"'},
            )
            return False
        if faults.bearer and not self._token_allows(given, path):
            self._error(
                401,
                "UNAUTHORIZED",
                "authentication required",
                {"WWW-Authenticate": self._challenge(path)},
            )
            return False
        return True

    def _needed_scopes(self, path: str) -> dict[str, str]:
        repo_match = re.match(r"^/v2/(.+)/(blobs|manifests)/", path) or _UPLOAD_RE.match(path)
        if repo_match is None:
            return {}
        action = "pull" if self.command in ("GET", "HEAD") else "push"
        needed = {repo_match.group(1): action}
        if "from" in self._query:
            needed[self._query["from"][0]] = "pull"
        return needed

    def _token_allows(self, given: str, path: str) -> bool:
        token = self.state.tokens.get(given.removeprefix("Bearer "))
        if token is None or time.monotonic() > token.expires_at:
            return False
        needed = self._needed_scopes(path)
        return all(action in token.grants.get(repo, set()) for repo, action in needed.items())

    def _challenge(self, path: str) -> str:
        realm = f"{self.state.scheme}://{self.state.realm_host}:{self._port()}/token"
        scopes = " ".join(
            f"repository:{repo}:{'pull' if action == 'pull' else 'pull,push'}"
            for repo, action in self._needed_scopes(path).items()
        )
        challenge = f'Bearer realm="{realm}",service="fault"'
        return challenge + (f',scope="{scopes}"' if scopes else "")

    def _token(self) -> None:
        faults = self.state.faults
        self.state.token_requests.append(self._query)
        realm_auth = faults.realm_auth
        if realm_auth is not None and self.headers.get("Authorization") != _basic(*realm_auth):
            return self._json(401, {"details": "bad credentials"})
        grants: dict[str, set[str]] = {}
        for scope in self._query.get("scope", []):
            for item in scope.split(" "):
                _, repo, actions = item.split(":")
                grants.setdefault(repo, set()).update(actions.split(","))
        value = f"tok-{next(self.state.counter)}"
        lifetime = faults.token_lifetime_s
        self.state.tokens[value] = _Token(grants, time.monotonic() + (lifetime or 60))
        answer: dict[str, object] = {faults.token_field: value}
        if lifetime is not None:
            answer["expires_in"] = lifetime
        return self._json(200, answer)

    def _injected_failure(self) -> bool:
        faults = self.state.faults
        with self.state.lock:
            if faults.fail_times <= 0:
                return False
            faults.fail_times -= 1
        headers = {"Retry-After": faults.retry_after} if faults.retry_after else {}
        self._error(faults.fail_status, "UNAVAILABLE", "injected failure", headers)
        return True

    # ------------------------------------------------------------------ blobs

    def _blob(self, digest: str, *, allow_redirect: bool) -> None:
        data = self.state.blobs.get(digest)
        if data is None:
            return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        if allow_redirect and self.state.faults.redirect_blobs and self.command == "GET":
            host = self.state.redirect_host
            target = f"{self.state.scheme}://{host}:{self._port()}/storage/{digest}"
            return self._send(307, b"", {"Location": target})
        ranges = self._requested_ranges()
        if ranges and not self.state.faults.ignore_range:
            return self._partial(data, ranges)
        return self._send_blob(200, data, {"Docker-Content-Digest": digest})

    def _requested_ranges(self) -> list[tuple[int, int]]:
        header = self.headers.get("Range", "")
        return [(int(a), int(b)) for a, b in _RANGE_RE.findall(header.removeprefix("bytes="))]

    def _partial(self, data: bytes, ranges: list[tuple[int, int]]) -> None:
        faults = self.state.faults
        if all(first >= len(data) for first, _ in ranges):  # as Go's http.ServeContent
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        if len(ranges) > 1 and faults.multi_range_status == 416:
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        if len(ranges) > 1 and faults.multi_range_status == 200:
            return self._send_blob(200, data, {})
        if len(ranges) == 1 or faults.coalesce_ranges:
            first, last = min(r[0] for r in ranges), max(r[1] for r in ranges)
            claimed = f"{first + faults.content_range_shift}-{last + faults.content_range_shift}"
            content_range = faults.content_range_override
            if content_range is None:
                content_range = f"bytes {claimed}/{len(data)}"
            headers = {"Content-Range": content_range} if content_range else {}
            return self._send_blob(206, data[first : last + 1], headers)
        boundary = "FAULTBOUNDARY"
        parts = b"".join(
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n".encode()
            + data[a : b + 1]
            + b"\r\n"
            for a, b in ranges
        )
        body = parts + f"--{boundary}--\r\n".encode()
        content_type = f"multipart/byteranges; boundary={boundary}"
        return self._send_blob(206, body, {"Content-Type": content_type})

    def _send_blob(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        faults = self.state.faults
        with self.state.lock:
            truncate = self.command == "GET" and faults.truncate_times > 0
            if truncate:
                faults.truncate_times -= 1
            stall = self.command == "GET" and faults.stall_times > 0
            if stall:
                faults.stall_times -= 1
        headers = {"Content-Type": "application/octet-stream", **headers}
        if stall:
            return self._send_stalling(status, body, headers)
        if not truncate:
            return self._send(status, body, headers)
        # Promise the whole body, send half, hang up.
        self._send_head(status, len(body), headers)
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _send_stalling(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """The first ``stall_after_bytes``, then nothing for ``stall_s`` (or a trickle)."""
        faults = self.state.faults
        self._send_head(status, len(body), headers)
        self.wfile.write(body[: faults.stall_after_bytes])
        self.wfile.flush()
        self.close_connection = True
        if faults.trickle_interval_s is None:
            self.state.closing.wait(faults.stall_s)
            return
        for offset in range(faults.stall_after_bytes, len(body)):
            if self.state.closing.wait(faults.trickle_interval_s):
                return
            try:
                self.wfile.write(body[offset : offset + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return

    def _send_head(self, status: int, length: int, headers: dict[str, str]) -> None:
        self._set_status(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    # -------------------------------------------------------------- manifests

    def _manifest(self, repo: str, ref: str) -> None:
        if self.command == "PUT":
            media_type = self.headers.get("Content-Type", "")
            digest = sha256_digest(self._body)
            self.state.manifests[(repo, ref)] = (media_type, self._body)
            self.state.manifests[(repo, digest)] = (media_type, self._body)
            return self._send(201, b"", {"Docker-Content-Digest": digest})
        found = self.state.manifests.get((repo, ref))
        if found is None:
            return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        media_type, data = found
        faults = self.state.faults
        headers = {
            "Content-Type": faults.manifest_content_type or media_type,
            "Docker-Content-Digest": faults.manifest_digest_header or sha256_digest(data),
        }
        return self._send_blob(200, data, headers)  # blob faults (stalls ...) apply too

    # ---------------------------------------------------------------- uploads

    def _start_upload(self, repo: str) -> None:
        mount = self._query.get("mount", [None])[0]
        if mount is not None and mount in self.state.blobs:
            return self._send(201, b"", {"Docker-Content-Digest": mount})
        upload_id = str(next(self.state.counter))
        self.state.uploads[upload_id] = bytearray()
        return self._send(202, b"", {"Location": f"/upload/{repo}/{upload_id}"})

    def _upload(self, repo: str, upload_id: str) -> None:
        buffer = self.state.uploads.get(upload_id)
        if buffer is None:
            return self._error(404, "BLOB_UPLOAD_UNKNOWN", "upload unknown")
        buffer += self._body
        if self.command == "PATCH":
            return self._send(202, b"", {"Location": f"/upload/{repo}/{upload_id}"})
        if self.command == "DELETE":
            del self.state.uploads[upload_id]
            return self._send(204, b"", {})
        digest = self._query.get("digest", [""])[0]
        if sha256_digest(bytes(buffer)) != digest:
            return self._error(
                400, "DIGEST_INVALID", "provided digest did not match uploaded content"
            )
        self.state.blobs[digest] = bytes(buffer)
        return self._send(201, b"", {"Docker-Content-Digest": digest})

    # ---------------------------------------------------------------- helpers

    def _port(self) -> int:
        address = self.server.server_address
        assert isinstance(address, tuple)
        return int(address[1])

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self._send(status, body, {"Content-Type": "application/json"})

    def _error(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _set_status(self, status: int) -> None:
        self._status = self._recorded.status = status

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self._set_status(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
