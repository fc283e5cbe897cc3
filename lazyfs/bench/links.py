"""Emulated links: a network namespace, a veth pair, ``tbf`` for bandwidth, a delay proxy for RTT.

The kernel here has no netem, so the two halves of a link are emulated separately:

- **bandwidth**: a token-bucket filter (``tc qdisc ... tbf``) on the egress of the namespace's
  end of a veth pair, the registry's side, so it shapes what the registry sends;
- **round-trip time**: :mod:`lazyfs.bench.proxy`, listening inside the namespace and forwarding
  to the registry, holds every segment RTT/2 in each direction.

Clients (skopeo, the lazyfs daemon) reach the registry at ``10.200.N.2:5000``, inside the
namespace, so everything they fetch crosses the shaper and the proxy; the proxy's counters are
the byte and request counts of the benchmark. :meth:`EmulatedLink.measure` checks what the link
really achieves through a probe service behind the same proxy, and :func:`check_link` says
whether that is within 10 % of the profile.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any, Self

from lazyfs.errors import LazyfsError, UsageError

REGISTRY_PORT = 5000
PROBE_PORT = 5001
TOLERANCE = 0.10
NETNS_PREFIX = "lzb-"
SUBNET_PREFIX = "10.200"
ETH_OVERHEAD = 1514 / 1448  # an L2 frame per 1448 TCP payload bytes (MTU 1500, timestamps)
_PROXY_START_S = 10.0
_PROXY_STOP_S = 5.0
_PROBE_TIMEOUT_S = 30.0
_PING_COUNT = 15
_BULK_SECONDS = 2.0
_BULK_MIN_BYTES = 1 << 20
_BULK_MAX_BYTES = 256 << 20
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-z/]*)\s*$")


@dataclass(frozen=True)
class LinkProfile:
    """A link: bandwidth in bit/s (None: unlimited) and round-trip time in seconds."""

    name: str
    rate_bps: int | None
    rtt_s: float

    def describe(self) -> str:
        rate = "unlimited" if self.rate_bps is None else format_rate(self.rate_bps)
        return f"{self.name} ({rate}, RTT {self.rtt_s * 1000:g} ms)"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rate_bps": self.rate_bps, "rtt_s": self.rtt_s}


DEFAULT_PROFILES: dict[str, LinkProfile] = {  # names as in lazyfs.bench.PROFILE_NAMES
    "loopback": LinkProfile("loopback", None, 0.0),
    "lan": LinkProfile("lan", 10**9, 0.001),
    "wan": LinkProfile("wan", 100 * 10**6, 0.050),
    "edge": LinkProfile("edge", 20 * 10**6, 0.150),
}


def format_rate(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bit/s"


def profile_by_name(name: str) -> LinkProfile:
    try:
        return DEFAULT_PROFILES[name]
    except KeyError:
        known = ", ".join(DEFAULT_PROFILES)
        raise UsageError(f"unknown link profile {name!r} (known: {known})") from None


def parse_link(text: str) -> LinkProfile:
    """``rate=100mbit,rtt=50ms[,name=NAME]``; rate ``unlimited`` or a tc rate, rtt with a unit."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("rate", "rtt", "name") or key in fields:
            raise UsageError(f"malformed --link {text!r}: expected rate=RATE,rtt=TIME[,name=NAME]")
        fields[key] = value.strip()
    if "rate" not in fields or "rtt" not in fields:
        raise UsageError(f"malformed --link {text!r}: both rate= and rtt= are required")
    name = fields.get("name") or "custom"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
        raise UsageError(f"malformed --link {text!r}: name must be 1-32 of [A-Za-z0-9_.-]")
    return LinkProfile(name, parse_rate(fields["rate"]), parse_rtt(fields["rtt"]))


def parse_rate(text: str) -> int | None:
    """``unlimited``, or a number with a unit of bit/s: ``20mbit``, ``1gbit``, ``500kbit``."""
    if text.strip().lower() in ("unlimited", "none", "inf"):
        return None
    number, unit = _number_unit(text, "rate")
    scale = _RATE_UNITS.get(unit.removesuffix("/s"))
    if scale is None or number <= 0:
        raise UsageError(f"invalid rate {text!r}: use e.g. 20mbit, 1gbit or unlimited")
    rate = int(number * scale)
    if rate < 8000:
        raise UsageError(f"invalid rate {text!r}: at least 8kbit")
    return rate


def parse_rtt(text: str) -> float:
    """A round-trip time with a unit: ``50ms``, ``0.15s``, ``500us``, or ``0``."""
    number, unit = _number_unit(text, "rtt")
    if number == 0 and not unit:
        return 0.0
    scale = _TIME_UNITS.get(unit)
    if scale is None:
        raise UsageError(f"invalid rtt {text!r}: use e.g. 50ms, 0.15s or 500us")
    rtt = number * scale
    if rtt > 10:
        raise UsageError(f"invalid rtt {text!r}: at most 10 s")
    return rtt


def _number_unit(text: str, what: str) -> tuple[float, str]:
    match = _NUMBER_UNIT.match(text.lower())
    if match is None:
        raise UsageError(f"invalid {what} {text!r}")
    return float(match.group(1)), match.group(2)


@dataclass(frozen=True)
class LinkMeasurement:
    """What the emulated link achieved: TCP goodput in bit/s and the median RTT."""

    rate_bps: float
    rtt_s: float
    bulk_bytes: int


@dataclass(frozen=True)
class LinkCheck:
    profile: LinkProfile
    measured: LinkMeasurement
    rate_ok: bool
    rtt_ok: bool

    @property
    def ok(self) -> bool:
        return self.rate_ok and self.rtt_ok

    def problems(self) -> list[str]:
        out = []
        if not self.rate_ok:
            out.append(
                f"throughput {format_rate(self.measured.rate_bps)} is not within "
                f"{TOLERANCE:.0%} of {format_rate(self.profile.rate_bps or 0)}"
            )
        if not self.rtt_ok:
            out.append(
                f"RTT {self.measured.rtt_s * 1000:.2f} ms is not within {TOLERANCE:.0%} of "
                f"{self.profile.rtt_s * 1000:g} ms"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "configured_rate_bps": self.profile.rate_bps,
            "configured_rtt_s": self.profile.rtt_s,
            "measured_rate_bps": round(self.measured.rate_bps),
            "measured_rtt_s": round(self.measured.rtt_s, 6),
            "rate_ok": self.rate_ok,
            "rtt_ok": self.rtt_ok,
            "ok": self.ok,
        }


def within(measured: float, configured: float, tolerance: float = TOLERANCE) -> bool:
    """``measured`` is within ``tolerance`` (a fraction) of ``configured``, bounds included."""
    return abs(measured - configured) <= tolerance * configured * (1 + 1e-9)


def check_link(profile: LinkProfile, measured: LinkMeasurement) -> LinkCheck:
    """Unlimited rates and zero RTTs have nothing to be within 10 % of: they always pass."""
    rate_ok = profile.rate_bps is None or within(measured.rate_bps, profile.rate_bps)
    rtt_ok = profile.rtt_s == 0 or within(measured.rtt_s, profile.rtt_s)
    return LinkCheck(profile, measured, rate_ok, rtt_ok)


def tbf_arguments(rate_bps: int) -> list[str]:
    """``tc qdisc ... tbf`` parameters: a bucket of 2 ms of data (>= 64 KiB, a GSO packet),
    and a queue of 100 ms so TCP can fill the link without overflowing it."""
    byte_rate = rate_bps // 8
    burst = max(64 << 10, byte_rate // 500)
    limit = max(4 * burst, byte_rate // 10)
    return ["rate", f"{rate_bps}bit", "burst", str(burst), "limit", str(limit)]


def _run(*argv: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LazyfsError(f"{argv[0]} failed: {exc}") from exc
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()
        raise LazyfsError(f"{' '.join(argv)}: {detail[-1] if detail else result.returncode}")
    return result.stdout


def _try(*argv: str) -> None:
    subprocess.run(argv, capture_output=True, check=False, timeout=30)


def reap_stale_namespaces() -> list[str]:
    """Delete namespaces that earlier benches left behind when they were killed."""
    removed = []
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NETNS_PREFIX}(\d+)", name)
        if match and not _alive(int(match.group(1))):
            _try("ip", "netns", "del", name)
            _try("ip", "link", "del", f"lzbh{match.group(1)}")
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_subnet() -> int:
    used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", _run("ip", "-4", "addr")))
    start = os.getpid() % 256
    for offset in range(256):
        candidate = (start + offset) % 256
        if str(candidate) not in used:
            return candidate
    raise LazyfsError(f"no free {SUBNET_PREFIX}.N.0/30 subnet for the emulated link")


class EmulatedLink:
    """A namespace, veth pair, shaper and delay proxy in front of the registry at ``upstream``.

    A context manager: the namespace, veth pair and proxy are gone after it, on every path.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        pid = os.getpid()
        self.netns = f"{NETNS_PREFIX}{pid}"
        self._host_if = f"lzbh{pid}"
        self._ns_if = f"lzbn{pid}"
        self._subnet = -1
        self._proxy: subprocess.Popen[str] | None = None
        self.base_rtt_s = 0.0
        self.profile: LinkProfile = DEFAULT_PROFILES["loopback"]

    @property
    def ns_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self._subnet}.2"

    @property
    def registry_host(self) -> str:
        """Where clients find the registry through the link (``HOST:PORT``)."""
        return f"{self.ns_address}:{REGISTRY_PORT}"

    def __enter__(self) -> Self:
        try:
            self._create_namespace()
            self._start_proxy()
            self.base_rtt_s = self._ping()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create_namespace(self) -> None:
        reap_stale_namespaces()
        self._subnet = _free_subnet()
        host = f"{SUBNET_PREFIX}.{self._subnet}.1/30"
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
        _run("ip", "link", "set", self._ns_if, "netns", self.netns)
        _run("ip", "addr", "add", host, "dev", self._host_if)
        _run("ip", "link", "set", self._host_if, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.ns_address}/30", "dev", self._ns_if)
        _run("ip", "-n", self.netns, "link", "set", self._ns_if, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")

    def _start_proxy(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "lazyfs.bench.proxy",
            "--netns",
            self.netns,
            "--route",
            f"registry={self.ns_address}:{REGISTRY_PORT}={self.upstream}",
            "--route",
            f"probe={self.ns_address}:{PROBE_PORT}=probe",
        ]
        self._proxy = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        answer = self._read_answer(_PROXY_START_S)
        if not answer.get("ready"):
            raise LazyfsError(f"the delay proxy did not start: {answer}")

    def _read_answer(self, timeout_s: float) -> dict[str, Any]:
        proxy = self._proxy
        if proxy is None or proxy.stdout is None:
            raise LazyfsError("the delay proxy is not running")
        line = _readline_within(proxy.stdout, timeout_s)
        if not line:
            raise LazyfsError(f"the delay proxy exited (status {proxy.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _command(self, line: str) -> dict[str, Any]:
        proxy = self._proxy
        if proxy is None or proxy.stdin is None:
            raise LazyfsError("the delay proxy is not running")
        try:
            proxy.stdin.write(line + "\n")
            proxy.stdin.flush()
        except OSError as exc:
            raise LazyfsError(f"the delay proxy is gone: {exc}") from exc
        return self._read_answer(_PROXY_START_S)

    def apply(self, profile: LinkProfile) -> None:
        """Shape the link to ``profile``: tbf on the registry side, the proxy's hold time.

        The proxy path itself costs ``base_rtt_s`` (measured at start with no hold), so the
        proxy holds the rest of the RTT."""
        if profile.rate_bps is None:
            _try(
                "ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev", self._ns_if, "root"
            )
        else:
            _run(
                "ip", "netns", "exec", self.netns, "tc", "qdisc", "replace",
                "dev", self._ns_if, "root", "tbf", *tbf_arguments(profile.rate_bps),
            )  # fmt: skip
        hold = max(0.0, profile.rtt_s - self.base_rtt_s) if profile.rtt_s > 0 else 0.0
        bdp = int((profile.rate_bps or 10**10) / 8 * profile.rtt_s * 2)
        self._command(f"rtt {hold:.9f} {bdp}")
        self.profile = profile

    def counters(self) -> dict[str, int]:
        """What crossed the link to and from the registry so far (monotonic counters)."""
        snapshot = self._command("stats")
        registry: dict[str, int] = snapshot.get("registry", {})
        return dict(registry)

    def rtt_s(self) -> float:
        """The median RTT now (through the shaper's queue: what a fill adds to it shows)."""
        return self._ping()

    def measure(self, bulk_bytes: int | None = None) -> LinkMeasurement:
        rtt = self._ping()
        size = bulk_bytes or self._bulk_size()
        return LinkMeasurement(self._throughput(size), rtt, size)

    def check(self, bulk_bytes: int | None = None) -> LinkCheck:
        return check_link(self.profile, self.measure(bulk_bytes))

    def _bulk_size(self) -> int:
        rate = self.profile.rate_bps
        if rate is None:
            return 128 << 20
        return max(_BULK_MIN_BYTES, min(_BULK_MAX_BYTES, int(rate / 8 * _BULK_SECONDS)))

    def _probe(self) -> socket.socket:
        sock = socket.create_connection((self.ns_address, PROBE_PORT), timeout=_PROBE_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _ping(self) -> float:
        with self._probe() as sock:
            sock.sendall(b"echo\nw")
            _recv_exactly(sock, 1)  # the first answer also pays the emulated handshake
            samples = []
            for _ in range(_PING_COUNT):
                started = time.monotonic()
                sock.sendall(b"p")
                _recv_exactly(sock, 1)
                samples.append(time.monotonic() - started)
        return statistics.median(samples)

    def _throughput(self, size: int) -> float:
        """Goodput from the first byte to the last, so the RTT does not count."""
        with self._probe() as sock:
            sock.sendall(f"bulk {size}\n".encode())
            first = sock.recv(1 << 20)
            started = time.monotonic()
            received = len(first)
            for _ in range(size):  # bounded: every pass receives at least one byte or ends
                if received >= size:
                    break
                data = sock.recv(1 << 20)
                if not data:
                    break
                received += len(data)
            elapsed = time.monotonic() - started
        if received < size:
            raise LazyfsError(f"link probe: got {received} of {size} bytes")
        return (received - len(first)) * 8 / max(elapsed, 1e-9)

    def close(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            _stop(proxy)
        _try("ip", "netns", "del", self.netns)
        _try("ip", "link", "del", self._host_if)


def _stop(proxy: subprocess.Popen[str]) -> None:
    try:
        if proxy.stdin is not None:
            proxy.stdin.close()
        proxy.wait(_PROXY_STOP_S)
    except (OSError, subprocess.TimeoutExpired):
        proxy.kill()
        proxy.wait()
    if proxy.stdout is not None:
        proxy.stdout.close()


def _readline_within(stream: IO[str], timeout_s: float) -> str:
    import select

    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else ""


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise LazyfsError("link probe: connection closed")
        data += chunk
    return data
