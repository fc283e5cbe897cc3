"""``lazyfs serve`` end to end: one process for every image, sharing, crashes, signals, access,
metrics. Real registry, real FUSE, the real CLI (docs/service.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import ROOT, run_lazyfs, stats
from prometheus_client.parser import text_string_to_metric_families

from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.mount.mountinfo import is_mounted, mounts
from lazyfs.registry.localserver import LocalRegistry

FILES = {f"data/f{i:02}.bin": random_bytes(192 << 10, seed=i) for i in range(24)}
ONLY_B = {"data/only-b.txt": b"this file is in image b only\n"}


@dataclass
class Served:
    """A ``lazyfs serve`` process started by a test."""

    process: subprocess.Popen[bytes]
    socket: Path
    run_dir: Path
    cache_dir: Path
    log: Path

    def mount(self, ref: str, mountpoint: Path, *flags: str) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        run_lazyfs("mount", "--socket", str(self.socket), *flags, ref, str(mountpoint))

    def call(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_lazyfs(*args, "--socket", str(self.socket))


def start_service(where: Path, *extra: str) -> Served:
    where.mkdir(parents=True, exist_ok=True)
    run_dir, cache_dir, log = where / "run", where / "cache", where / "service.log"
    argv = [
        sys.executable, "-m", "lazyfs", "--log-level", "info", "serve",
        "--cache-dir", str(cache_dir), "--run-dir", str(run_dir), *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, cwd=ROOT)
    served = Served(process, run_dir / "control.sock", run_dir, cache_dir, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"lazyfs serve exited: {log.read_text()}")
        if run_lazyfs("stats", "--socket", str(served.socket), check=False).returncode == 0:
            return served
        time.sleep(0.05)
    raise AssertionError("lazyfs serve did not come up")


def stop(served: Served) -> None:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=20)


def lazyfs_mounts() -> list[Path]:
    return [entry.mountpoint for entry in mounts() if entry.fstype == "fuse.lazyfs"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, str, str]]:
    """Images a and b: the same 24 files (4.5 MiB), b with one file more; a registry of their
    own, so that its log counts only what these tests fetch."""
    work = tmp_path_factory.mktemp("service-images")
    with LocalRegistry(work / "registry") as registry:
        refs = []
        for name, files in (("a", FILES), ("b", {**FILES, **ONLY_B})):
            entries = with_parent_dirs(regular_file(p, d) for p, d in files.items())
            image = write_image(work / name, "v1", [entries])
            ref = f"{registry.host}/service-{name}:v1"
            run_lazyfs("convert", "-q", image.reference, ref)
            refs.append(ref)
        yield registry, refs[0], refs[1]


def read_all(mountpoint: Path, files: dict[str, bytes], threads: int) -> None:
    def check(path: str) -> None:
        assert (mountpoint / path).read_bytes() == files[path], path

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(check, sorted(files)))


def blob_bytes(registry: LocalRegistry) -> int:
    return registry.access_log_summary().written("GET", "/v2/")


def test_two_images_one_process_fetch_shared_chunks_once(
    images: tuple[LocalRegistry, str, str], service: Served, tmp_path: Path
) -> None:
    registry, ref_a, ref_b = images
    # Baseline: image a alone, in a service of its own with an empty cache.
    alone = start_service(tmp_path / "alone")
    try:
        alone.mount(ref_a, tmp_path / "alone-mnt", "--no-prefetch")
        before = blob_bytes(registry)
        read_all(tmp_path / "alone-mnt", FILES, 16)
        alone_bytes = blob_bytes(registry) - before
        alone_chunks = stats(tmp_path / "alone-mnt")["chunks_fetched"]
    finally:
        stop(alone)

    mnt_a, mnt_b = tmp_path / "a", tmp_path / "b"
    service.mount(ref_a, mnt_a, "--no-prefetch")
    service.mount(ref_b, mnt_b, "--no-prefetch")
    assert stats(mnt_a)["pid"] == stats(mnt_b)["pid"] == service.process.pid
    before = blob_bytes(registry)
    with ThreadPoolExecutor(2) as both:  # 16 threads on each image, at the same time
        jobs = [
            both.submit(read_all, mnt_a, FILES, 16),
            both.submit(read_all, mnt_b, {**FILES, **ONLY_B}, 16),
        ]
        for job in jobs:
            job.result()
    shared_bytes = blob_bytes(registry) - before
    fetched = stats(mnt_a)["chunks_fetched"] + stats(mnt_b)["chunks_fetched"]
    assert fetched == alone_chunks + 1  # every shared chunk once, and b's own file
    assert shared_bytes <= 1.02 * alone_bytes + (64 << 10)
    listed = json.loads(service.call("stats", "--json").stdout)
    assert listed["images"] == 2 and listed["mounts"] == 2
    service.call("umount", str(mnt_a))
    service.call("umount", str(mnt_b))
    assert not is_mounted(mnt_a) and not is_mounted(mnt_b)


def test_kill_9_then_umount_clears_and_restart_restores(
    images: tuple[LocalRegistry, str, str], tmp_path: Path
) -> None:
    registry, ref_a, ref_b = images
    first = start_service(tmp_path)
    kept, cleared = tmp_path / "kept", tmp_path / "cleared"
    try:
        first.mount(ref_a, kept)
        first.mount(ref_b, cleared)
        read_all(kept, FILES, 8)  # everything cached: the restart must not need the registry
        _wait_cached(first)  # served chunks are written to the cache just after
        with ThreadPoolExecutor(4) as readers:
            pending = [readers.submit(_read_until_error, cleared) for _ in range(4)]
            time.sleep(0.3)
            first.process.kill()  # kill -9, during reads
            first.process.wait(timeout=10)
            for job in pending:
                job.result()
        assert run_lazyfs("umount", str(cleared)).returncode == 0
        assert not is_mounted(cleared)
        assert is_mounted(kept)  # still there, dead
        registry.stop()
        second = start_service(tmp_path)
        try:
            _wait_live(kept)
            read_all(kept, FILES, 8)
            assert stats(kept)["pid"] == second.process.pid
            assert not is_mounted(cleared), "a mount cleared while the service was dead came back"
        finally:
            stop(second)
    finally:
        registry.start()
        stop(first)
    assert not [m for m in lazyfs_mounts() if str(m).startswith(str(tmp_path))]


def _read_until_error(mountpoint: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            for path in FILES:
                (mountpoint / path).read_bytes()
        except OSError:
            return  # the service died under us: errors, as documented


def _wait_cached(served: Served) -> None:
    """Until the service has written every chunk it fetched to the cache."""
    deadline = time.monotonic() + 30
    while json.loads(served.call("stats", "--json").stdout)["chunks_in_flight"]:
        assert time.monotonic() < deadline, "chunks still not cached after 30 s"
        time.sleep(0.05)


def _wait_live(mountpoint: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            stats(mountpoint)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{mountpoint} was not restored")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_leave_no_stale_mount(
    images: tuple[LocalRegistry, str, str], tmp_path: Path, signum: int
) -> None:
    _registry, ref_a, ref_b = images
    served = start_service(tmp_path)
    served.mount(ref_a, tmp_path / "a")
    served.mount(ref_b, tmp_path / "b")
    assert (tmp_path / "a" / "data" / "f00.bin").read_bytes() == FILES["data/f00.bin"]
    started = time.monotonic()
    served.process.send_signal(signum)
    served.process.wait(timeout=10)
    assert time.monotonic() - started < 5
    assert not [m for m in lazyfs_mounts() if str(m).startswith(str(tmp_path))]
    # A restart after a clean stop (an upgrade) brings both mounts back.
    again = start_service(tmp_path)
    try:
        _wait_live(tmp_path / "a")
        _wait_live(tmp_path / "b")
    finally:
        stop(again)


def test_user_without_socket_access_cannot_mount(
    images: tuple[LocalRegistry, str, str], service: Served, tmp_path: Path
) -> None:
    _registry, ref_a, _ = images
    assert service.socket.stat().st_mode & 0o777 == 0o600
    mnt = Path(tempfile.mkdtemp(prefix="lazyfs-nobody-"))  # where nobody can reach it
    os.chown(mnt, 65534, 65534)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "lazyfs", "mount", "--socket", str(service.socket), ref_a, str(mnt)],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": str(mnt)},  # nobody's, not root's
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "permission denied" in last and last.startswith("lazyfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    mnt.rmdir()


def test_mount_replaces_a_dead_mount(
    images: tuple[LocalRegistry, str, str], tmp_path: Path
) -> None:
    _registry, ref_a, _ = images
    first = start_service(tmp_path / "first")
    mnt = tmp_path / "mnt"
    first.mount(ref_a, mnt)
    first.process.kill()
    first.process.wait(timeout=10)
    second = start_service(tmp_path / "second")
    try:
        second.mount(ref_a, mnt)
        assert (mnt / "data" / "f01.bin").read_bytes() == FILES["data/f01.bin"]
        second.call("umount", str(mnt))
    finally:
        stop(second)
        # The dead service's own root stays dead until that service starts again.
        subprocess.run(["umount", "-l", str(first.run_dir / "root")], check=False)
    assert not is_mounted(mnt)


def test_metrics_are_prometheus_text_and_agree_with_stats(
    images: tuple[LocalRegistry, str, str], tmp_path: Path
) -> None:
    _registry, ref_a, _ = images
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    served = start_service(tmp_path, "--metrics-addr", f"127.0.0.1:{port}")
    try:
        mnt = tmp_path / "mnt"
        served.mount(ref_a, mnt, "--no-prefetch")
        read_all(mnt, FILES, 4)
        counters = stats(mnt)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = answer.read().decode()
        samples = {
            (s.name, s.labels.get("image", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        image = counters["reference"]
        for key in ("bytes_fetched", "range_requests", "cache_hits", "cache_misses"):
            assert samples[(f"lazyfs_{key}_total", image)] == counters[key], key
            assert samples[(f"lazyfs_service_{key}_total", "")] == counters[key], key
        assert samples[("lazyfs_verification_failures_total", image)] == 0
        assert samples[("lazyfs_read_latency_seconds_count", image)] > 0
        assert samples[("lazyfs_fetch_latency_seconds_count", image)] == counters["range_requests"]
        assert samples[("lazyfs_mounts", "")] == 1
    finally:
        stop(served)


def test_on_demand_service_serves_every_mount_of_a_cache(
    images: tuple[LocalRegistry, str, str], tmp_path: Path
) -> None:
    """Scripts that pass only --cache-dir get one service per cache, started on demand."""
    _registry, ref_a, ref_b = images
    cache = tmp_path / "cache"
    for name, ref in (("a", ref_a), ("b", ref_b)):
        (tmp_path / name).mkdir()
        result = run_lazyfs("mount", "--cache-dir", str(cache), ref, str(tmp_path / name))
        assert "lazyfs: started a mount service" in result.stderr or name == "b"
    pid = stats(tmp_path / "a")["pid"]
    assert stats(tmp_path / "b")["pid"] == pid
    digest = hashlib.sha256((tmp_path / "b" / "data" / "only-b.txt").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(ONLY_B["data/only-b.txt"]).hexdigest()
    run_lazyfs("umount", str(tmp_path / "a"))
    run_lazyfs("umount", str(tmp_path / "b"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the on-demand service did not exit after its last image")


def test_a_mount_through_a_running_service_is_one_round_trip(tmp_path: Path) -> None:
    """No health probe before the open: the service the cache's service.json names (here a
    stand-in that answers every request) gets the open request and nothing else."""
    cache_dir, mountpoint, path = tmp_path / "cache", tmp_path / "mnt", tmp_path / "fake.sock"
    cache_dir.mkdir()
    mountpoint.mkdir()
    record = {"socket": str(path), "root": str(tmp_path), "pid": 1}
    (cache_dir / "service.json").write_text(json.dumps(record))
    answer = {"ok": True, "pid": 4242, "image": "sha256-" + "0" * 64, "offline": False}
    ops: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(0.1)

        def serve() -> None:
            while (done := client.poll()) is None:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn, conn.makefile("rb") as lines:
                    ops.append(json.loads(lines.readline())["op"])
                    conn.sendall(json.dumps(answer).encode() + b"\n")
            assert done == 0, client.stderr.read() if client.stderr else ""

        argv = ["mount", "--cache-dir", str(cache_dir), "localhost:5000/app:v1", str(mountpoint)]
        client = subprocess.Popen(
            [sys.executable, "-m", "lazyfs", *argv], stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        serve()
    assert ops == ["open"]


def test_registry_stopped_mid_read_fails_reads_not_the_service(
    images: tuple[LocalRegistry, str, str], service: Served, tmp_path: Path
) -> None:
    """Reads that need the registry fail (EIO) while it is down; the service stays up, and the
    same reads give the right bytes once it is back."""
    registry, _ref_a, ref_b = images
    mnt = tmp_path / "b"
    service.mount(ref_b, mnt, "--no-prefetch", "--read-timeout", "3")
    registry.stop()
    try:
        with pytest.raises(OSError) as caught:
            (mnt / "data" / "f07.bin").read_bytes()
        assert caught.value.errno == errno.EIO
        assert service.process.poll() is None
    finally:
        registry.start()
    read_all(mnt, {**FILES, **ONLY_B}, 8)
    assert stats(mnt)["verification_failures"] == 0
    service.call("umount", str(mnt))


def test_a_remount_reuses_the_indexed_image(
    images: tuple[LocalRegistry, str, str], service: Served, tmp_path: Path
) -> None:
    """The service keeps released images indexed: mounting one again resolves the tag (one
    manifest request) and fetches, parses and builds nothing else."""
    registry, ref_a, _ = images
    service.mount(ref_a, tmp_path / "m1")
    service.call("umount", str(tmp_path / "m1"))
    before = registry.access_log_summary()
    service.mount(ref_a, tmp_path / "m2")
    after = registry.access_log_summary()
    try:
        blob_requests = after.count("GET", "/v2/service-a/blobs") - before.count(
            "GET", "/v2/service-a/blobs"
        )
        assert blob_requests == 0
        assert (tmp_path / "m2" / "data/f00.bin").read_bytes() == FILES["data/f00.bin"]
    finally:
        service.call("umount", str(tmp_path / "m2"))
