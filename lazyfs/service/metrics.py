"""The Prometheus text endpoint (``lazyfs serve --metrics-addr HOST:PORT``, path /metrics).

Per image (label ``image``, its pinned reference) and for the whole service: bytes fetched and
range requests, cache hits and misses, verification failures, contained internal errors, and
read- and fetch-latency histograms. The figures are the ones ``lazyfs stats`` shows. Service
totals include images released since the start, so every counter only grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketStream

from lazyfs.model.histogram import LatencyHistogram
from lazyfs.registry.lanes import LaneStats

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 8 << 10
_REQUEST_TIMEOUT_S = 10.0

# (stats key, metric name without prefix, help)
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("bytes_fetched", "bytes_fetched_total", "Compressed bytes fetched from registries."),
    ("range_requests", "range_requests_total", "Range requests sent to registries."),
    ("chunks_fetched", "chunks_fetched_total", "Chunks fetched and verified."),
    ("cache_hits", "cache_hits_total", "Chunks found in the cache."),
    ("cache_misses", "cache_misses_total", "Chunks not in the cache."),
    ("memory_hits", "memory_hits_total", "Chunks served from memory."),
    ("verification_failures", "verification_failures_total", "Chunks that failed their digest."),
    ("internal_errors", "internal_errors_total", "Bugs contained: requests answered EIO."),
)


@dataclass(frozen=True)
class ImageFigures:
    reference: str
    counters: dict[str, int]
    read_latency: LatencyHistogram
    fetch_latency: LatencyHistogram


@dataclass(frozen=True)
class ServiceFigures:
    images: list[ImageFigures]
    totals: ImageFigures  # every image since start, released ones included
    mounts: int
    cache_chunk_bytes: int
    fill_wire: LaneStats = field(default_factory=LaneStats)


def render(figures: ServiceFigures) -> str:
    lines: list[str] = []
    for key, name, text in COUNTERS:
        lines += _family(f"lazyfs_{name}", "counter", text)
        lines += [
            _sample(f"lazyfs_{name}", {"image": i.reference}, i.counters[key])
            for i in figures.images
        ]
        lines += _family(f"lazyfs_service_{name}", "counter", text + " (whole service)")
        lines.append(_sample(f"lazyfs_service_{name}", {}, figures.totals.counters[key]))
    for attr, text in (("read_latency", "File reads"), ("fetch_latency", "Range requests")):
        name = f"lazyfs_{attr}_seconds"
        lines += _family(name, "histogram", f"{text}: seconds from start to answer.")
        for image in figures.images:
            lines += _histogram(name, {"image": image.reference}, getattr(image, attr))
        lines += _family(f"lazyfs_service_{attr}_seconds", "histogram", f"{text} (whole service).")
        lines += _histogram(f"lazyfs_service_{attr}_seconds", {}, getattr(figures.totals, attr))
    lines += _gauge("lazyfs_images", "Images served.", len(figures.images))
    lines += _gauge("lazyfs_mounts", "Bind mounts of served images.", figures.mounts)
    lines += _gauge(
        "lazyfs_cache_chunk_bytes", "Bytes of chunks in the cache.", figures.cache_chunk_bytes
    )
    lines += _fill_wire(figures.fill_wire)
    return "\n".join(lines) + "\n"


def _fill_wire(lane: LaneStats) -> list[str]:
    """The background fill on the wire (registry/lanes.py), whole service."""
    lines: list[str] = []
    for name, text, value in (
        ("lazyfs_fill_wire_requests", "Background (fill) requests sent.", lane.background_requests),
        ("lazyfs_fill_wire_bytes", "Body bytes of background answers read.", lane.background_bytes),
        ("lazyfs_fill_wire_pauses", "Waits of the fill for foreground requests.", lane.pauses),
        ("lazyfs_fill_wire_paused_seconds", "Seconds the fill waited for them.", lane.paused_s),
    ):
        lines += _family(name, "counter", text)
        lines.append(_sample(name, {}, value))
    lines += _gauge(
        "lazyfs_fill_wire_window_bytes",
        "Receive window last set on a fill connection.",
        lane.window_bytes,
    )
    return lines


def _family(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _gauge(name: str, text: str, value: int) -> list[str]:
    return [*_family(name, "gauge", text), _sample(name, {}, value)]


def _histogram(name: str, labels: dict[str, str], histogram: LatencyHistogram) -> Iterator[str]:
    for bound, count in histogram.cumulative():
        le = "+Inf" if bound == float("inf") else repr(bound)
        yield _sample(f"{name}_bucket", {**labels, "le": le}, count)
    yield _sample(f"{name}_sum", labels, histogram.sum_s)
    yield _sample(f"{name}_count", labels, histogram.count)


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {value}"
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
    return f"{name}{{{text}}} {value}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


async def serve_metrics(host: str, port: int, figures: Callable[[], ServiceFigures]) -> None:
    """Answer ``GET /metrics`` until cancelled; anything else gets 404."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    log.info("metrics on http://%s:%d/metrics", host, port)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    await _answer(stream, figures)
            except Exception as exc:  # a bad scrape must not end the service
                log.info("metrics request failed: %s", exc)

    await listener.serve(handle)


async def _answer(stream: SocketStream, figures: Callable[[], ServiceFigures]) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        data = await stream.receive(4096)
        request += data
        if len(request) > _MAX_REQUEST_BYTES:
            break
    method, _, rest = request.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if method in (b"GET", b"HEAD") and path == b"/metrics":
        body = render(figures()).encode()
        status, content_type = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
    else:
        body, status, content_type = b"not found\n", "404 Not Found", "text/plain"
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send(head + (body if method != b"HEAD" else b""))


def merged(histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
    total = LatencyHistogram()
    for histogram in histograms:
        total.add(histogram)
    return total
