"""Shared pieces of the benchmarks: input data from this machine's /usr, tar and OCI layout
writers, timing, page-cache dropping, and the table every benchmark prints.

Rules every benchmark follows (docs/benchmarks.md):

- every figure comes with a baseline measured in the same run, and the ratio figure/baseline;
- nothing asserts a timing: benchmarks print, they never fail on a slow result;
- each benchmark is bounded in time and cleans up (mounts, registries, temporary files) even
  when it fails or is interrupted (SIGTERM and SIGHUP become KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from lazyfs.convert.layout import OciLayout
from lazyfs.model import manifests
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, ImageConfig, Manifest
from lazyfs.model.platform import Platform

KIB = 1024
MIB = 1024 * KIB
MB = 1_000_000
FIXED_MTIME = 1_700_000_000
ROOT = Path(__file__).resolve().parent.parent
_COPY_BYTES = 1 << 20


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


# --- input data from /usr ----------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """A regular file of this machine, and the name it gets in a layer tar."""

    path: Path
    name: str
    size: int
    mode: int


def usr_files(root: Path = Path("/usr"), max_file_bytes: int = 32 * MIB) -> list[SourceFile]:
    """Every readable regular file under ``root`` up to ``max_file_bytes``, in sorted path order.

    Symlinks are not followed. The order is deterministic for a given machine.
    """
    found: list[SourceFile] = []
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if not _is_regular(st.st_mode) or st.st_size > max_file_bytes:
                continue
            if not os.access(path, os.R_OK):
                continue
            arcname = str(path.relative_to(root.parent))
            found.append(SourceFile(path, arcname, st.st_size, st.st_mode & 0o7777))
    return found


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def sample_files(
    files: Sequence[SourceFile],
    *,
    target_bytes: int | None = None,
    target_count: int | None = None,
    salt: str = "lazyfs-bench",
) -> list[SourceFile]:
    """A deterministic uniform sample of ``files`` up to a target size or count, in path order.

    Files are ranked by the sha256 of their name (with ``salt``) and taken in that order, so the
    sample keeps the tree's mix of binaries, libraries, scripts and text, and a file added to or
    removed from the tree changes the sample by at most that file.
    """
    if not files:
        raise RuntimeError("no input files found")
    ranked = sorted(files, key=lambda f: hashlib.sha256(f"{salt}/{f.name}".encode()).digest())
    chosen: list[SourceFile] = []
    size = 0
    for f in ranked:
        if _reached(size, len(chosen), target_bytes, target_count):
            break
        chosen.append(f)
        size += f.size
    return sorted(chosen, key=lambda f: f.name)


def _reached(size: int, count: int, target_bytes: int | None, target_count: int | None) -> bool:
    if target_bytes is not None and size >= target_bytes:
        return True
    return target_count is not None and count >= target_count


@dataclass(frozen=True)
class Composition:
    files: int
    bytes: int
    elf_bytes: int
    text_bytes: int
    other_bytes: int

    def describe(self) -> str:
        def pct(n: int) -> str:
            return f"{100 * n / max(self.bytes, 1):.0f}%"

        return (
            f"{self.files} files, {self.bytes / MB:.1f} MB: ELF {pct(self.elf_bytes)}, "
            f"text-like {pct(self.text_bytes)}, other binary {pct(self.other_bytes)}"
        )


def composition(files: Sequence[SourceFile]) -> Composition:
    """How much of the input is ELF, text-like (no NUL in the first 8 KiB), other binary."""
    elf = text = other = 0
    for f in files:
        try:
            with f.path.open("rb") as handle:
                head = handle.read(8192)
        except OSError:
            head = b""
        if head.startswith(b"\x7fELF"):
            elf += f.size
        elif b"\0" not in head:
            text += f.size
        else:
            other += f.size
    return Composition(len(files), sum(f.size for f in files), elf, text, other)


# --- layer tars --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarItem:
    """A regular file of a layer: its name, mode, and how to get its bytes."""

    name: str
    mode: int
    read: Callable[[], bytes]


def items_of(files: Sequence[SourceFile]) -> list[TarItem]:
    return [TarItem(f.name, f.mode, f.path.read_bytes) for f in files]


def write_layer_tar(items: Sequence[TarItem], out: BinaryIO) -> int:
    """A reproducible PAX tar of ``items`` with their parent directories; returns file count."""
    dirs: set[str] = set()
    for item in items:
        parts = item.name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[str, TarItem | None]] = [(d, None) for d in dirs]
        entries += [(item.name, item) for item in items]
        for name, entry in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mtime = FIXED_MTIME
            info.uname = info.gname = ""
            if entry is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            data = entry.read()
            info.size, info.mode = len(data), entry.mode
            tar.addfile(info, _BytesReader(data))
    return len(items)


class _BytesReader:
    """A minimal file object over bytes, for tarfile.addfile."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._position + size
        piece = bytes(self._view[self._position : end])
        self._position += len(piece)
        return piece


def write_tar_file(items: Sequence[TarItem], path: Path) -> int:
    with path.open("wb") as out:
        write_layer_tar(items, out)
    return path.stat().st_size


# --- OCI layouts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    layout_dir: Path
    tag: str
    layers: tuple[Descriptor, ...]
    tar_sizes: tuple[int, ...]

    @property
    def reference(self) -> str:
        return f"oci:{self.layout_dir}:{self.tag}"


def gzip_file(src: Path, dest: Path, level: int = 6) -> tuple[Digest, Digest, int]:
    """gzip ``src`` into ``dest`` (no name, no mtime); (diff_id, blob digest, blob size)."""
    tar_hash, blob_hash = hashlib.sha256(), hashlib.sha256()
    with src.open("rb") as source, dest.open("wb") as raw:
        writer = _HashingWriter(raw, blob_hash)
        fileobj = cast(BinaryIO, writer)
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=fileobj, mtime=0, compresslevel=level
        ) as gz:
            while block := source.read(_COPY_BYTES):
                tar_hash.update(block)
                gz.write(block)
    return (
        Digest("sha256", tar_hash.hexdigest()),
        Digest("sha256", blob_hash.hexdigest()),
        dest.stat().st_size,
    )


class _HashingWriter:
    def __init__(self, out: BinaryIO, hasher: hashlib._Hash) -> None:
        self._out = out
        self._hash = hasher

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def write_oci_image(layout_dir: Path, tag: str, layer_tars: Sequence[Path]) -> BuiltImage:
    """An OCI layout holding one image whose layers are ``layer_tars``, gzip-compressed."""
    layout = OciLayout.create(layout_dir)
    layers: list[Descriptor] = []
    diff_ids: list[Digest] = []
    tar_sizes: list[int] = []
    for tar_path in layer_tars:
        blob_tmp = layout_dir / f".{tar_path.name}.gz"
        diff_id, digest, size = gzip_file(tar_path, blob_tmp)
        layout.add_blob_file(blob_tmp, digest)
        layers.append(Descriptor(media_type=manifests.OCI_LAYER_TAR_GZIP, digest=digest, size=size))
        diff_ids.append(diff_id)
        tar_sizes.append(tar_path.stat().st_size)
    host = Platform.host()
    config_fields: dict[str, object] = {
        "architecture": host.architecture,
        "os": host.os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    config = ImageConfig(config_fields).with_diff_ids(diff_ids).to_bytes()
    layout.add_image(config, layers, tag)
    return BuiltImage(layout_dir, tag, tuple(layers), tuple(tar_sizes))


def read_manifest(layout_dir: Path, tag: str) -> Manifest:
    layout = OciLayout(layout_dir)
    descriptor = layout.resolve(tag)
    return Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)
