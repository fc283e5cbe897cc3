"""The cache bound (issue 12): it covers everything under the cache directory, is stored with
the cache, and holds on disk (``du -sb`` within bound + 10 % + 16 MiB); pins (issue 13) keep an
image's chunks from eviction in every process that evicts."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import diskcache
import pytest

from lazyfs.cache.bound import read_bound
from lazyfs.cache.pins import PinnedImage
from lazyfs.cache.store import ChunkCache
from lazyfs.errors import CacheError, PinTooLargeError
from lazyfs.model.digest import Digest

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CHUNK = 256 << 10


def key_of(data: bytes) -> str:
    """A cache key; the store does not re-hash (the resolver verified the bytes already)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chunks(count: int, seed: int, size: int = CHUNK) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        data = rnd.randbytes(size)
        out.append((key_of(data), data))
    return out


def du_bytes(directory: Path) -> int:
    result = subprocess.run(
        ["du", "-sb", str(directory)], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[0])


def keep_blob(cache: ChunkCache, data: bytes) -> Digest:
    """A whole blob kept as a pull-through proxy's answer is (cache.blobs.keeper)."""
    digest = Digest.of(data)
    keeper = cache.blobs.keeper(digest)
    assert keeper is not None
    with keeper:
        keeper.write(data)
        keeper.commit()
    return digest


# ------------------------------------------------------------------------- the stored bound


def test_the_bound_is_stored_with_the_cache(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    ChunkCache(directory, 5 * MiB).close()
    assert read_bound(directory / "bound.json") == 5 * MiB
    again = ChunkCache(directory, None)  # no --cache-size: the stored bound
    assert again.size_limit_bytes == 5 * MiB
    again.close()
    changed = ChunkCache(directory, 7 * MiB)  # another --cache-size replaces it
    changed.close()
    assert read_bound(directory / "bound.json") == 7 * MiB
    assert ChunkCache(directory, None).size_limit_bytes == 7 * MiB


def test_a_cache_from_before_the_file_keeps_its_last_bound(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    with diskcache.Cache(str(directory / "chunks"), size_limit=3 * MiB):
        pass
    cache = ChunkCache(directory, None)
    assert cache.size_limit_bytes == 3 * MiB
    cache.close()
    assert read_bound(directory / "bound.json") == 3 * MiB
    fresh = ChunkCache(tmp_path / "new", None)
    assert fresh.size_limit_bytes == 10 << 30
    fresh.close()


@pytest.mark.parametrize(
    "content", [b"{", b'{"size_limit_bytes": -1}', b'{"size_limit_bytes": 1.5}']
)
def test_a_broken_bound_file_is_one_line(tmp_path: Path, content: bytes) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    (directory / "bound.json").write_bytes(content)
    with pytest.raises(CacheError) as caught:
        ChunkCache(directory, None)
    assert "\n" not in str(caught.value)
    ChunkCache(directory, MiB).close()  # an explicit bound replaces it


# ---------------------------------------------------------------------- a bound that holds


def test_real_writes_past_a_small_bound_stay_within_it_on_disk(tmp_path: Path) -> None:
    """48 MiB of chunks, 24 MiB of kept blobs and metadata through a 16 MiB cache."""
    directory = tmp_path / "cache"
    bound = 16 * MiB
    cache = ChunkCache(directory, bound)
    try:
        rnd = random.Random(7)
        written: list[str] = []
        peak = 0
        for round_ in range(12):
            batch = chunks(16, seed=round_)  # 4 MiB a round
            cache.put_chunks(batch)
            written.extend(key for key, _ in batch)
            if round_ % 2 == 0:
                keep_blob(cache, rnd.randbytes(4 * MiB))
            cache.put_meta(f"blob:sha256:{round_:064x}", rnd.randbytes(64 << 10))
            totals = cache.totals(fresh=True)
            assert totals.counted_bytes <= bound + CHUNK, totals
            peak = max(peak, du_bytes(directory))
            assert peak <= bound * 1.1 + 16 * MiB
        assert cache.chunk_count < len(written)
        assert written[-1] in cache.chunk_keys()  # the newest survive
    finally:
        cache.close()
    usage = du_bytes(directory)
    assert usage <= bound * 1.1 + 16 * MiB
    print(f"\nbound {bound} bytes; du -sb: at most {peak} bytes after a round, {usage} at the end")


def test_local_blobs_go_before_chunks_and_held_blobs_stay(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = ChunkCache(directory, 8 * MiB)
    try:
        old = keep_blob(cache, random.Random(1).randbytes(2 * MiB))
        os.utime(cache.blobs.path(old), (1, 1))  # the least recently used
        used = keep_blob(cache, random.Random(2).randbytes(2 * MiB))
        os.utime(cache.blobs.path(used), (2, 2))
        cache.blobs._read(used, [])  # a mount reads it: held by this process
        first = chunks(12, seed=3)  # 3 MiB
        cache.put_chunks(first)
        assert cache.blobs.has(old) and cache.blobs.has(used)
        cache.put_chunks(chunks(8, seed=4))  # 2 MiB more: past the bound
        assert not cache.blobs.has(old)  # evicted before any chunk
        assert cache.blobs.has(used)  # held: never evicted
        assert {key for key, _ in first} <= set(cache.chunk_keys())
        cache.put_chunks(chunks(16, seed=5))  # then chunks go, least recently used
        assert cache.blobs.has(used)
        assert not {key for key, _ in first} <= set(cache.chunk_keys())
        assert cache.totals(fresh=True).counted_bytes <= 8 * MiB + CHUNK
    finally:
        cache.close()


# ----------------------------------------------------------------------------------- pins


def _pin(cache: ChunkCache, name: str, entries: list[tuple[str, bytes]]) -> None:
    sizes = [(key, len(data)) for key, data in entries]
    image = PinnedImage(f"sha256:{name * 64}"[:71], f"example.com/{name}:1", len(sizes),
                        sum(size for _, size in sizes), 0)  # fmt: skip
    cache.pin(image, sizes)


WRITER = textwrap.dedent(
    """
    import hashlib, random, sys
    from pathlib import Path
    from lazyfs.cache.store import ChunkCache
    cache = ChunkCache(Path(sys.argv[1]), None)  # the stored bound, as a service would
    rnd = random.Random(int(sys.argv[2]))
    for _ in range(int(sys.argv[3])):
        data = rnd.randbytes(256 << 10)
        cache.put_chunks([("sha256:" + hashlib.sha256(data).hexdigest(), data)])
    cache.close()
    """
)


def _write_in_another_process(directory: Path, seed: int, count: int) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(directory), str(seed), str(count)],
                   check=True, cwd=REPO, timeout=120)  # fmt: skip


def test_pinned_chunks_survive_eviction_in_another_process(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = ChunkCache(directory, 8 * MiB)
    try:
        pinned = chunks(12, seed=10)  # 3 MiB, the oldest
        cache.put_chunks(pinned)
        _pin(cache, "a", pinned)
        _, totals = cache.pinned()
        assert totals.chunks == 12 and totals.bytes == 12 * CHUNK
        assert totals.cached_bytes == 12 * CHUNK
        _write_in_another_process(directory, seed=11, count=60)  # 15 MiB through the rest
        keys = set(cache.chunk_keys())
        assert {key for key, _ in pinned} <= keys
        assert cache.totals(fresh=True).counted_bytes <= 8 * MiB + CHUNK
        assert cache.unpin("example.com/a:1", None) == ["sha256:" + "a" * 64]
        _write_in_another_process(directory, seed=12, count=40)
        assert not {key for key, _ in pinned} & set(cache.chunk_keys())  # released: evicted
    finally:
        cache.close()


def test_a_pin_past_the_bound_pins_nothing(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", 4 * MiB)
    try:
        small = chunks(4, seed=20)
        _pin(cache, "s", small)  # 1 MiB: fits
        big = chunks(16, seed=21)  # 4 MiB of pinned data: with the 1 MiB, past the bound
        with pytest.raises(PinTooLargeError) as caught:
            _pin(cache, "b", big)
        assert "\n" not in str(caught.value) and "example.com/b:1" in str(caught.value)
        images, totals = cache.pinned()
        assert [image.reference for image in images] == ["example.com/s:1"]
        assert totals.bytes == 4 * CHUNK
    finally:
        cache.close()


def test_a_bound_stored_by_another_open_is_taken_up(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    running = ChunkCache(directory, 64 * MiB)  # a service's handle
    try:
        running.put_chunks(chunks(24, seed=30))  # 6 MiB
        ChunkCache(directory, 4 * MiB).close()  # `lazyfs serve --cache-size 4M` elsewhere
        running.put_chunks(chunks(1, seed=31))
        assert running.size_limit_bytes == 4 * MiB
        assert running.totals(fresh=True).counted_bytes <= 4 * MiB + CHUNK
    finally:
        running.close()
