"""Progress display for long work: a single rewritten line on a TTY, nothing otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from lazyfs.convert.converter import ConvertProgress, LayerSummary
from lazyfs.model.manifests import Descriptor

_REFRESH_S = 0.1


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError("unreachable")


class TerminalConvertProgress(ConvertProgress):
    """Shows bytes per layer on a terminal; called from worker threads, hence the lock."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._label = ""
        self._last_draw = 0.0

    @staticmethod
    def wanted(stream: TextIO = sys.stderr) -> bool:
        return stream.isatty()

    def layer_started(self, index: int, count: int, descriptor: Descriptor) -> None:
        with self._lock:
            self._label = f"layer {index + 1}/{count} {str(descriptor.digest)[7:19]}"
            self._draw(f"{self._label} starting", force=True)

    def layer_bytes(self, phase: str, done_bytes: int, total_bytes: int) -> None:
        with self._lock:
            total = max(total_bytes, 1)
            percent = min(100.0, 100.0 * done_bytes / total)
            self._draw(
                f"{self._label} {phase:<10} {human_bytes(done_bytes)} / "
                f"{human_bytes(total_bytes)} ({percent:.0f}%)"
            )

    def layer_finished(self, summary: LayerSummary) -> None:
        with self._lock:
            self._draw(
                f"{self._label} done: {human_bytes(summary.tar_size_bytes)} tar -> "
                f"{human_bytes(summary.size_bytes)}, {summary.file_count} files, "
                f"{summary.chunk_count} chunks",
                force=True,
            )
            self._stream.write("\n")

    def _draw(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < _REFRESH_S:
            return
        self._last_draw = now
        self._stream.write("\r\x1b[K" + text)
        self._stream.flush()
