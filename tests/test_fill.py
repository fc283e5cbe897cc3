"""Background fill (``lazyfs mount --fill``): the rest of the image fetched after the mount,
resumable, then served with the registry gone; and the service-wide token bucket that caps it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import Served, read_all, start_service, stop

from lazyfs.convert.imagebuild import regular_file, with_parent_dirs, write_image
from lazyfs.mount.fill import TokenBucket
from lazyfs.registry.localserver import LocalRegistry

FILES = {f"lib/part{i:02}.bin": random_bytes(256 << 10, seed=300 + i) for i in range(20)}


def wait_filled(mountpoint: Path, timeout_s: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        figures = json.loads(run_lazyfs("stats", "--json", str(mountpoint)).stdout)
        if figures["fill"]["state"] in ("done", "failed"):
            return figures  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"the fill did not finish: {figures['fill']}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    service = start_service(tmp_path / "svc")
    try:
        yield service
    finally:
        stop(service)


def test_fill_makes_the_image_offline_safe_and_resumes_without_refetching(
    served: Served, tmp_path: Path
) -> None:
    with LocalRegistry(tmp_path / "registry") as registry:
        entries = with_parent_dirs(regular_file(p, d) for p, d in FILES.items())
        built = write_image(tmp_path / "src", "v1", [entries])
        ref = f"{registry.host}/fill/app:v1"
        run_lazyfs("convert", "-q", built.reference, ref)
        mountpoint = tmp_path / "mnt"
        served.mount(ref, mountpoint, "--fill")
        figures = wait_filled(mountpoint)
        fill = figures["fill"]
        assert fill["state"] == "done" and fill["done_bytes"] == fill["total_bytes"] > 0  # type: ignore[index]
        assert "offline-safe" in run_lazyfs("stats", str(mountpoint)).stdout
        served.call("umount", str(mountpoint))

        # After a restart, the fill finds everything cached: no blob is fetched again.
        stop(served)
        again = start_service(tmp_path / "svc")
        before = registry.access_log_summary().count("GET", "/v2/fill/app/blobs")
        again.mount(ref, mountpoint, "--fill")
        assert wait_filled(mountpoint)["fill"]["state"] == "done"  # type: ignore[index]
        assert registry.access_log_summary().count("GET", "/v2/fill/app/blobs") == before
    # The registry is gone: every byte is served from the cache.
    try:
        read_all(mountpoint, FILES, threads=4)
    finally:
        again.call("umount", str(mountpoint))
        stop(again)


def test_token_bucket_caps_the_rate_across_takers() -> None:
    async def main() -> float:
        bucket = TokenBucket(1 << 20, burst_bytes=2 << 20)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:  # two images sharing the bucket
            for _ in range(2):
                nursery.start_soon(_take_all, bucket)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # 2 x 5 MiB at 1 MiB/s, the first 2 MiB from the burst: 8 s of the mocked clock.
    assert elapsed == pytest.approx(8.0, rel=0.01)


async def _take_all(bucket: TokenBucket) -> None:
    for _ in range(5):
        await bucket.take(1 << 20)


def test_no_cap_never_waits() -> None:
    async def main() -> float:
        bucket, start = TokenBucket(None), trio.current_time()
        await bucket.take(1 << 40)
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 0
