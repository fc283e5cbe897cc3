"""Run a workload the way a container runtime would, and time it.

The workload runs in a chroot of an overlay whose lower layer is the image (a lazyfs mount or
an unpacked tree) and whose upper layer is a tmpfs, with ``/proc`` and ``/dev`` mounted. All of
that happens in a child process in its own mount namespace (``unshare --mount``), so the mounts
vanish with it on every exit path, and the bench process never touches them.

The child reports CLOCK_MONOTONIC instants (comparable across processes) as one JSON line:

- ``t_rootfs``: the overlay, ``/proc`` and ``/dev`` are ready;
- ``t_first_byte``: the first page of the entrypoint executable has been read (the first file
  a runtime reads: ``execve`` starts by reading its first page; measured by reading it first);
- ``t_ready``: the workload exited with status 0, or printed the ready line.

With ``measure_resident`` it also reports how many bytes of the lower layer's files are in the
page cache afterwards (``mincore``): with read-ahead off, that is exactly what the workload read,
page by page, through ``read`` or ``mmap``.

Run as ``python -m lazyfs.bench.workload SPEC_JSON`` (inside ``unshare``) by :func:`run_workload`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.errors import LazyfsError

DEFAULT_TIMEOUT_S = 600.0
PAGE = os.sysconf("SC_PAGE_SIZE")
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
_SYMLINK_HOPS = 40
_TAIL_LINES = 20
_MAX_OUTPUT_LINES = 1_000_000
_PROT_READ = 1
_MAP_SHARED = 1
_KILL_WAIT_S = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkloadSpec:
    """What to run, on which tree, and when it counts as ready."""

    lower: str
    command: tuple[str, ...]
    ready_line: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    scratch: str = "/tmp"
    measure_resident: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkloadSpec:
        fields: dict[str, Any] = json.loads(text)
        fields["command"] = tuple(fields["command"])
        return cls(**fields)


@dataclass
class WorkloadResult:
    t_spawned: float = 0.0
    t_rootfs: float = 0.0
    t_first_byte: float = 0.0
    t_ready: float = 0.0
    ready_by: str = ""
    exit_status: int | None = None
    workload_cpu_s: float = 0.0
    resident_bytes: int | None = None
    output_tail: list[str] = field(default_factory=list)
    error: str | None = None


def run_workload(spec: WorkloadSpec) -> WorkloadResult:
    """Run ``spec`` in a new mount namespace; raise LazyfsError unless it became ready."""
    argv = ["unshare", "--mount", "--propagation", "private", "--"]
    argv += [sys.executable, "-m", "lazyfs.bench.workload", spec.to_json()]
    spawned = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=spec.timeout_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LazyfsError(f"workload runner did not finish in {spec.timeout_s + 60:.0f} s") from exc
    result = _parse_result(done)
    result.t_spawned = spawned
    if result.error is not None:
        tail = " | ".join(result.output_tail[-3:])
        raise LazyfsError(f"workload {' '.join(spec.command)!r}: {result.error}; output: {tail}")
    return result


def _parse_result(done: subprocess.CompletedProcess[str]) -> WorkloadResult:
    lines = done.stdout.strip().splitlines()
    if not lines:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise LazyfsError(f"workload runner failed: {detail[0]}")
    try:
        return WorkloadResult(**json.loads(lines[-1]))
    except (ValueError, TypeError) as exc:
        raise LazyfsError(f"workload runner answered {lines[-1]!r}") from exc


# --- the child, inside its own mount namespace -----------------------------------------------


def _mount(*argv: str) -> None:
    result = subprocess.run(["mount", *argv], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LazyfsError(f"mount {' '.join(argv)}: {result.stderr.strip()}")


def prepare_rootfs(lower: str, scratch: Path) -> Path:
    """tmpfs upper, overlay, /proc and /dev: the root a runtime would chroot into."""
    _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(scratch))
    for name in ("upper", "work", "merged"):
        (scratch / name).mkdir()
    merged = scratch / "merged"
    options = f"lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
    _mount("-t", "overlay", "-o", options, "overlay", str(merged))
    for name in ("proc", "dev", "tmp"):
        (merged / name).mkdir(exist_ok=True)
    _mount("-t", "proc", "proc", str(merged / "proc"))
    _mount("--rbind", "/dev", str(merged / "dev"))
    return merged


def resolve_in_root(root: Path, path: str) -> Path:
    """``path`` resolved as if ``root`` were ``/`` (symlinks included); the host path."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    for _hop in range(_SYMLINK_HOPS * 8):
        if not parts:
            return root.joinpath(*resolved)
        part = parts.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        host = root.joinpath(*resolved, part)
        if host.is_symlink():
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    raise LazyfsError(f"too many symlinks resolving {path} in {root}")


def find_executable(root: Path, name: str) -> Path:
    """Where ``execvp`` would find ``name`` in the chroot ``root``."""
    if "/" in name:
        return resolve_in_root(root, name)
    for directory in ENV["PATH"].split(":"):
        candidate = resolve_in_root(root, f"{directory}/{name}")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise LazyfsError(f"{name}: not found on PATH in the image")


def read_first_page(path: Path) -> None:
    with path.open("rb", buffering=0) as executable:
        if not executable.read(PAGE):
            raise LazyfsError(f"{path} is empty")


def _enter_root(root: Path) -> None:
    """In the workload's child before exec: die with the runner, then chroot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.chroot(root)
    os.chdir("/")


def _watch(process: subprocess.Popen[bytes], spec: WorkloadSpec, result: WorkloadResult) -> None:
    """Read output until the ready line, exit, or the deadline (bounded)."""
    assert process.stdout is not None
    deadline = time.monotonic() + spec.timeout_s
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    needle = spec.ready_line
    pending = b""
    for _ in range(_MAX_OUTPUT_LINES):
        left = deadline - time.monotonic()
        if left <= 0:
            result.error = f"not ready after {spec.timeout_s:.0f} s"
            break
        readable, _, _ = select.select([process.stdout], [], [], left)
        if not readable:
            continue
        data = os.read(process.stdout.fileno(), 65536)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            tail.append(text)
            if needle is not None and needle in text:
                result.t_ready, result.ready_by = time.monotonic(), "line"
                result.output_tail = list(tail)
                return
    if pending:
        tail.append(pending.decode(errors="replace"))
    result.output_tail = list(tail)


def _finish(process: subprocess.Popen[bytes], spec: WorkloadSpec, result: WorkloadResult) -> None:
    if result.ready_by == "line" or result.error is not None:
        _kill_group(process)
        return
    status = process.wait(timeout=_KILL_WAIT_S)
    result.exit_status = status
    if status != 0:
        result.error = f"exited with status {status}"
    elif spec.ready_line is not None:
        result.error = f"exited before printing {spec.ready_line!r}"
    else:
        result.t_ready, result.ready_by = time.monotonic(), "exit"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=_KILL_WAIT_S)


def run_in_namespace(spec: WorkloadSpec) -> WorkloadResult:
    """The child's work: mounts, first-byte probe, workload, optional mincore pass."""
    with tempfile.TemporaryDirectory(prefix="lazyfs-bench-", dir=spec.scratch) as scratch:
        try:
            return _run_in_root(spec, Path(scratch))
        finally:
            # Before the directory's cleanup, which would fail on the mounts and hide the error.
            _umount_all(Path(scratch))


def _run_in_root(spec: WorkloadSpec, scratch: Path) -> WorkloadResult:
    result = WorkloadResult()
    root = prepare_rootfs(spec.lower, scratch)
    result.t_rootfs = time.monotonic()
    read_first_page(find_executable(root, spec.command[0]))
    result.t_first_byte = time.monotonic()
    before = os.times()
    process = subprocess.Popen(
        spec.command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=ENV,
        preexec_fn=lambda: _enter_root(root),  # the child is single-threaded
        start_new_session=True,
    )
    try:
        _watch(process, spec, result)
        _finish(process, spec, result)
    finally:
        if process.poll() is None:
            _kill_group(process)
    after = os.times()
    result.workload_cpu_s = round(
        (after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        3,
    )
    if spec.measure_resident:
        result.resident_bytes = resident_bytes(Path(spec.lower))
    return result


def _umount_all(scratch: Path) -> None:
    # Leaving the namespace unmounts everything anyway; this only lets the directory go.
    subprocess.run(["umount", "-R", "-l", str(scratch)], capture_output=True, check=False)


# --- page-cache residency (mincore) ----------------------------------------------------------


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def file_resident_bytes(libc: ctypes.CDLL, path: str, size: int) -> int:
    """Bytes of ``path`` in the page cache (whole pages, the last one cut at ``size``)."""
    if size <= 0:
        return 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        address = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, ctypes.c_void_p(-1).value):
        return 0
    try:
        pages = (size + PAGE - 1) // PAGE
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), size, vector) != 0:
            return 0
        flags = bytes(vector)
    finally:
        libc.munmap(ctypes.c_void_p(address), size)
    resident = sum(1 for flag in flags if flag & 1) * PAGE
    if flags[-1] & 1:
        resident -= pages * PAGE - size
    return resident


def _regular_files(root: Path) -> Iterator[tuple[str, int]]:
    """Each regular file under ``root`` once (hard links counted once), with its size."""
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            key = (info.st_dev, info.st_ino)
            if stat.S_ISREG(info.st_mode) and key not in seen:
                seen.add(key)
                yield path, info.st_size


def resident_bytes(root: Path) -> int:
    libc = _libc()
    return sum(file_resident_bytes(libc, path, size) for path, size in _regular_files(root))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    spec = WorkloadSpec.from_json(args[0])
    try:
        result = run_in_namespace(spec)
    except (LazyfsError, OSError, subprocess.SubprocessError) as exc:
        result = WorkloadResult(error=str(exc))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
