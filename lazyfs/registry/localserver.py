"""Run Debian's ``docker-registry`` (CNCF distribution 2.8) on a free loopback port.

Used by the tests, ``lazyfs demo`` and ``lazyfs bench``. The registry writes its log (logrus
lines plus the access log) to a file next to its config; :meth:`LocalRegistry.access_log_summary`
reads the ``http.response.written`` fields from it, which gives a byte count independent of the
client's own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from lazyfs.errors import RegistryError, RegistryUnreachableError

REGISTRY_BINARY = "docker-registry"
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 3
_POLL_INTERVAL_S = 0.05

# logrus writes `key=value` or `key="quoted value"` pairs.
_LOGRUS_FIELD_RE = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class AccessLogSummary:
    """What the registry says it served, per (method, path without query)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_by_request: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def bytes_written(self) -> int:
        """Body bytes sent in all responses (``http.response.written``)."""
        return sum(self.bytes_by_request.values())

    def count(self, method: str, path_prefix: str = "") -> int:
        """Requests with ``method`` whose path starts with ``path_prefix``."""
        return _sum_matching(self.requests, method, path_prefix)

    def written(self, method: str, path_prefix: str = "") -> int:
        """Body bytes sent for requests with ``method`` whose path starts with ``path_prefix``."""
        return _sum_matching(self.bytes_by_request, method, path_prefix)


class LocalRegistry:
    """A throw-away ``docker-registry serve`` on 127.0.0.1, as a (sync) context manager."""

    def __init__(
        self,
        root_dir: Path,
        *,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.root_dir = root_dir
        self.storage_dir = root_dir / "storage"
        self.access_log = root_dir / "registry.log"
        self.config_path = root_dir / "config.yml"
        self._requested_port = port
        self._extra_config: Mapping[str, Any] = extra_config or {}
        self._port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        # A fixed secret silences the startup warning about load-balanced uploads.
        self._http_secret = secrets.token_hex(16)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of image references."""
        return f"127.0.0.1:{self._port}"

    @property
    def uses_tls(self) -> bool:
        http = self._extra_config.get("http", {})
        return isinstance(http, Mapping) and "tls" in http

    @property
    def url(self) -> str:
        return f"{'https' if self.uses_tls else 'http'}://{self.host}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the registry and wait until ``/v2/`` answers."""
        binary = shutil.which(REGISTRY_BINARY)
        if binary is None:
            raise RegistryError(
                f"{REGISTRY_BINARY} not found on PATH (install Debian's docker-registry package)"
            )
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        # A restart keeps the address: references to its images stay valid.
        wanted = self._requested_port or self._port or None
        attempts = 1 if wanted is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self._port = wanted or _free_loopback_port()
            self._spawn(binary)
            if self._wait_until_ready() or attempt == attempts:
                break
            # Another process took the port between our probe and the registry's bind: retry.
            self._reap()
        if self._process is None or self._process.poll() is not None:
            self._reap()
            raise RegistryError(f"{REGISTRY_BINARY} exited at startup: {self._log_tail()}")

    def stop(self) -> None:
        """Terminate the registry (kill it if it does not exit in time)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._reap()

    def access_log_summary(self) -> AccessLogSummary:
        """Count requests and sum ``http.response.written`` in the log so far."""
        summary = AccessLogSummary()
        if not self.access_log.exists():
            return summary
        with self.access_log.open(encoding="utf-8", errors="replace") as log:
            for line in log:
                fields = _completed_response_fields(line)
                if fields is None:
                    continue
                path = fields.get("http.request.uri", "").partition("?")[0]
                key = (fields.get("http.request.method", ""), path)
                summary.requests[key] += 1
                summary.bytes_by_request[key] += int(fields.get("http.response.written") or 0)
        return summary

    def config(self) -> dict[str, Any]:
        """The registry configuration: the minimal one merged with ``extra_config``."""
        base: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host, "secret": self._http_secret},
        }
        return _deep_merge(base, self._extra_config)

    def _spawn(self, binary: str) -> None:
        # JSON is YAML, so no YAML writer is needed.
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self._log_file = self.access_log.open("ab")
        self._process = subprocess.Popen(
            [binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=_registry_environment(),
        )

    def _wait_until_ready(self) -> bool:
        """Poll ``/v2/`` until any HTTP answer; False if the process died first."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(_POLL_INTERVAL_S)
        self.stop()
        raise RegistryUnreachableError(
            f"{REGISTRY_BINARY} on {self.host} did not answer within {STARTUP_TIMEOUT_S:.0f} s: "
            f"{self._log_tail()}"
        )

    def _answers(self) -> bool:
        context = ssl._create_unverified_context() if self.uses_tls else None
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=context):
                return True
        except urllib.error.HTTPError:
            return True  # 401 with auth configured still means it is up
        except (urllib.error.URLError, OSError):
            return False

    def _reap(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.access_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "no log"
        return " | ".join(text.strip().splitlines()[-lines:]) or "empty log"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _registry_environment() -> dict[str, str]:
    # distribution reads REGISTRY_* variables as config overrides, and podman's
    # REGISTRY_AUTH_FILE would become `auth.file`, so keep them away from the child.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def _sum_matching(counter: Counter[tuple[str, str]], method: str, path_prefix: str) -> int:
    return sum(
        n for (m, path), n in counter.items() if m == method and path.startswith(path_prefix)
    )


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _completed_response_fields(line: str) -> dict[str, str] | None:
    """The fields of a logrus "response completed" line, or None for any other line."""
    if 'msg="response completed' not in line:
        return None
    return {key: _unquote(value) for key, value in _LOGRUS_FIELD_RE.findall(line)}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value
