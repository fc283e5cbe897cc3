"""Shared pieces of the micro-benchmarks: the table every benchmark prints, the machine's
facts, timing, page-cache dropping, and running commands.

Rules every benchmark follows (docs/benchmarks.md):

- every figure comes with a baseline measured in the same run, and the ratio figure/baseline;
- nothing asserts a timing: benchmarks print, they never fail on a slow result;
- each benchmark is bounded in time and cleans up (mounts, registries, temporary files) even
  when it fails or is interrupted (SIGTERM and SIGHUP become KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
MB = 1_000_000


# --- the results table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure, its baseline from the same run, and ``ratio = value / baseline``."""

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline_value: float
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline_value if self.baseline_value else None


@dataclass
class Report:
    """Collects figures, prints them as they come and as a table at the end."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        baseline_name: str,
        baseline_value: float,
        note: str = "",
    ) -> Figure:
        figure = Figure(name, value, unit, baseline_name, baseline_value, note)
        self.figures.append(figure)
        ratio = figure.ratio
        shown = f"x{ratio:.3g}" if ratio is not None else "n/a"
        say(
            f"  {name}: {_number(value)} {unit}  |  baseline {baseline_name}: "
            f"{_number(baseline_value)} {unit}  |  ratio {shown}" + (f"  ({note})" if note else "")
        )
        return figure

    def fact(self, key: str, value: object) -> None:
        """A measured fact that is not a figure (sizes, counts), printed and kept."""
        self.facts[key] = value
        say(f"  {key}: {value}")

    def print_table(self) -> None:
        busy = other_cpu_percent()
        self.facts["CPU % used by other work at the end"] = round(busy, 1)
        print(f"\n## {self.title}\n", flush=True)
        print(f"(CPU used by other work at the end: {busy:.0f}% of all cores)\n")
        print("| figure | value | baseline | baseline value | ratio |")
        print("| --- | ---: | --- | ---: | ---: |")
        for f in self.figures:
            ratio = f"{f.ratio:.3g}" if f.ratio is not None else "n/a"
            note = f" ({f.note})" if f.note else ""
            print(
                f"| {f.name}{note} | {_number(f.value)} {f.unit} | {f.baseline_name} | "
                f"{_number(f.baseline_value)} {f.unit} | {ratio} |"
            )
        print(flush=True)

    def to_json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "machine": machine_facts(),
            "facts": self.facts,
            "figures": [{**asdict(f), "ratio": f.ratio} for f in self.figures],
        }

    def write_json(self, path: Path | None) -> None:
        if path is not None:
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
            say(f"results written to {path}")


def _number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def say(text: str) -> None:
    print(text, flush=True)


def step(text: str) -> None:
    print(f"==> {text}", file=sys.stderr, flush=True)


# --- the machine -------------------------------------------------------------------------------


def machine_facts() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
    }


def print_machine() -> float:
    """Print the machine's facts and how busy other work keeps it; return that percentage."""
    facts = machine_facts()
    say("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    busy_pct = other_cpu_percent()
    warning = "  (warning: the machine is busy; figures may be low)" if busy_pct > 10 else ""
    say(
        f"CPU used by other work at start: {busy_pct:.0f}% of all cores; "
        f"load average (1 min) {load_average():.2f}{warning}"
    )
    return busy_pct


def load_average() -> float:
    return os.getloadavg()[0]


def other_cpu_percent(interval_s: float = 1.0) -> float:
    """How busy the machine is while this process sleeps: other work skews every figure.
    (The load average alone cannot tell: it still counts the benchmark that just ran.)"""

    def busy_total() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    busy0, total0 = busy_total()
    time.sleep(interval_s)
    busy1, total1 = busy_total()
    return 100 * (busy1 - busy0) / max(total1 - total0, 1)


# --- timing ------------------------------------------------------------------------------------


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs: noise only ever makes a run slower."""
    return min(timed(run) for _ in range(repeats))


def mb_per_s(size_bytes: int, seconds: float) -> float:
    return size_bytes / seconds / MB if seconds > 0 else float("inf")


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextlib.contextmanager
def cpu_affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the block (and threads it starts) on ``cpus``; None leaves the affinity alone."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def drop_caches() -> bool:
    """Write back dirty pages and drop the page, dentry and inode caches (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        say(f"  warning: cannot drop caches ({exc}); 'cold' figures are not cold")
        return False
    return True


def read_file_seconds(path: Path, buffer_bytes: int = MIB) -> tuple[int, float]:
    """Read ``path`` sequentially to the end; (bytes, seconds)."""
    buffer = bytearray(buffer_bytes)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(view):
            total += count
    return total, time.perf_counter() - start


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float = 180,
    check: bool = True,
    stdout_null: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command (stdout captured, or discarded); on failure raise with its stderr."""
    result = subprocess.run(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if stdout_null else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        command = " ".join(str(a) for a in argv)
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def lazyfs_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "lazyfs", *(str(a) for a in args)]


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so ``finally`` blocks clean up."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def work_dir(requested: Path | None, prefix: str) -> Iterator[Path]:
    """``requested`` (created, kept) or a temporary directory removed afterwards."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested
        return
    # Under /var/tmp: on disk (never tmpfs), so "native file" baselines read a real disk.
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as tmp:
        yield Path(tmp)
