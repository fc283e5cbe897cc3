"""py-spy recordings of a running process, and a plain-text summary of one.

:func:`recording` runs ``py-spy record --pid PID --format raw --nonblocking --threads``
around a block (py-spy must be installed: ``pip install py-spy``); :func:`summary`
reads the collapsed stacks it wrote and gives the share of samples of each thread kind, the
functions where samples end (self time) and the functions on the most stacks (inclusive).

``python -m lazyfs.bench.micro.pyspy FILE`` prints the summary of a recording.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lazyfs.bench.processes import stop_process

RATE_HZ = 250
TOP = 12
_STOP_TIMEOUT_S = 30.0
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def recording(pid: int, out: Path, *, rate_hz: int = RATE_HZ) -> Iterator[None]:
    """Record ``pid`` while the block runs; the collapsed stacks go to ``out``."""
    binary = py_spy()
    if binary is None:
        print("  py-spy not found (pip install py-spy): not recording", flush=True)
        yield
        return
    argv = [
        binary, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", "raw",
        "--output", str(out), "--nonblocking", "--threads",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield
    finally:
        stop_process(process, _STOP_TIMEOUT_S, signal.SIGINT)


def _name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    short = "/".join(Path(path).parts[-2:]) if path else "?"
    return f"{match.group('func')} ({short})"


def _thread_kind(first: str) -> str:
    """``thread (TID): NAME``, py-spy's first frame with ``--threads``: the event loop is
    the main thread, worker threads are trio's."""
    name = first.partition("): ")[2]
    if name == "MainThread":
        return "event loop"
    if name.startswith("Trio thread"):
        return "worker threads"
    return name or "other"


def _ours(frame: str) -> bool:
    return "lazyfs/" in frame or "diskcache/" in frame


def summary(path: Path, top: int = TOP) -> list[str]:
    """Lines: samples in all, share per thread kind, top self and inclusive functions."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return [f"no recording ({exc})"]
    total = 0
    kinds: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        kind = _thread_kind(frames[0]) if frames[0].startswith("thread (") else "other"
        frames = [f for f in frames if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += count
        kinds[kind] += count
        names = [_name(f) for f in frames]
        own[names[-1]] += count
        for name in {n for n, f in zip(names, frames, strict=True) if _ours(f)}:
            inclusive[name] += count
    if not total:
        return ["no samples"]
    lines = [f"{total} samples at {RATE_HZ} Hz (idle threads excluded)"]
    lines.append(
        "threads: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in kinds.most_common())
    )
    lines.append("self:")
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    lines.append("inclusive (functions of lazyfs and diskcache):")
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    return lines


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(f"## {argument}")
        print("\n".join(summary(Path(argument))))
