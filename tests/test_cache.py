"""ChunkCache: round trips, verified reads, LRU eviction, the metadata store, sharing, crashes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from lazyfs.cache.store import ChunkCache
from lazyfs.errors import CacheError
from lazyfs.model.verity import format_verity, fsverity_digest

REPO = Path(__file__).resolve().parents[1]
SMALL = 1000  # older caches kept chunks under 32 KiB inside SQLite; now every chunk is a file
LARGE = 64 << 10
OLD_MIN_FILE_BYTES = 32 << 10  # the disk_min_file_size of those older caches
BOUND = 4 << 20  # for eviction tests: it covers the stores' databases and WAL files too


def verity_of(data: bytes) -> str:
    return format_verity(fsverity_digest(data))


def chunk(size: int, seed: int) -> tuple[str, bytes]:
    """Random chunk bytes and the key the resolver would store them under."""
    data = random.Random(seed).randbytes(size)
    return verity_of(data), data


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(directory: Path) -> Iterator[ChunkCache]:
    opened = ChunkCache(directory, 1 << 30)
    yield opened
    opened.close()


def value_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "chunks").rglob("*.val") if p.is_file())


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("size", [1, SMALL, (32 << 10) - 1, 32 << 10, LARGE, 1 << 20])
def test_put_get_round_trip(cache: ChunkCache, size: int) -> None:
    key, data = chunk(size, size)
    assert cache.get_chunk(key) is None
    assert not cache.has_chunk(key)
    cache.put_chunk(key, data)
    assert cache.get_chunk(key) == data
    assert cache.has_chunk(key)
    assert cache.chunk_keys() == [key]
    assert cache.chunk_bytes >= size


def test_put_is_idempotent(cache: ChunkCache) -> None:
    key, data = chunk(LARGE, 1)
    cache.put_chunk(key, data)
    cache.put_chunk(key, data)
    assert cache.chunk_keys() == [key]
    assert cache.get_chunk(key) == data
    assert len(value_files(cache.directory)) == 1  # the replaced file was cleaned up


def test_entries_survive_reopening(directory: Path) -> None:
    key, data = chunk(LARGE, 2)
    first = ChunkCache(directory, 1 << 30)
    first.put_chunk(key, data)
    first.put_meta("manifest:x", b"{}")
    first.close()
    reopened = ChunkCache(directory, 1 << 30)
    try:
        assert reopened.get_chunk(key) == data
        assert reopened.get_meta("manifest:x") == b"{}"
    finally:
        reopened.close()


# ------------------------------------------------------------------------- verified reads


@pytest.mark.parametrize("size", [SMALL, LARGE])
def test_verify_reads_drops_an_entry_tampered_through_another_handle(
    directory: Path, size: int
) -> None:
    key, data = chunk(size, 3)
    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        cache.put_chunk(key, data)
        assert cache.get_chunk(key) == data
        with diskcache.Cache(str(directory / "chunks")) as raw:
            raw.set(key, b"X" + data[1:])
        assert cache.get_chunk(key) is None
        assert not cache.has_chunk(key)  # dropped, so the next read refetches
        cache.put_chunk(key, data)
        assert cache.get_chunk(key) == data
    finally:
        cache.close()


def test_verify_reads_drops_an_entry_whose_file_rotted(directory: Path) -> None:
    key, data = chunk(LARGE, 4)
    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        cache.put_chunk(key, data)
        [stored] = value_files(directory)
        rotted = bytearray(stored.read_bytes())
        rotted[len(rotted) // 2] ^= 0x01
        stored.write_bytes(bytes(rotted))
        assert cache.get_chunk(key) is None
        assert not cache.has_chunk(key)
        assert cache.chunk_keys() == []
    finally:
        cache.close()


def test_without_verify_reads_the_disk_is_trusted(directory: Path) -> None:
    """The documented default: cache reads are not re-hashed (see CacheConfig.verify_reads)."""
    key, data = chunk(SMALL, 5)
    cache = ChunkCache(directory, 1 << 30)
    try:
        cache.put_chunk(key, data)
        with diskcache.Cache(str(directory / "chunks")) as raw:
            raw.set(key, b"tampered")
        assert cache.get_chunk(key) == b"tampered"
    finally:
        cache.close()


def test_verify_reads_keeps_good_entries(directory: Path) -> None:
    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        entries = [chunk(size, size) for size in (SMALL, LARGE, 4096, 4097)]
        for key, data in entries:
            cache.put_chunk(key, data)
        for key, data in entries:
            assert cache.get_chunk(key) == data
        assert sorted(cache.chunk_keys()) == sorted(key for key, _ in entries)
    finally:
        cache.close()


# ------------------------------------------------------------------------------- eviction


def test_size_limit_evicts_least_recently_used(directory: Path) -> None:
    limit = BOUND
    cache = ChunkCache(directory, limit)
    try:
        entries = [chunk(LARGE, i) for i in range(144)]  # 9 MiB through a 4 MiB cache
        hot = [entries[0], entries[1]]
        for index, (key, data) in enumerate(entries):
            cache.put_chunk(key, data)
            for hot_key, hot_data in hot:  # read the hot ones after every write
                if index >= 1:
                    assert cache.get_chunk(hot_key) == hot_data
        keys = set(cache.chunk_keys())
        assert {key for key, _ in hot} <= keys
        assert entries[-1][0] in keys  # the newest
        assert entries[2][0] not in keys  # written early, never read again
        assert len(keys) < len(entries)
        assert cache.chunk_bytes <= limit + LARGE
        assert len(value_files(directory)) == len(keys)  # evicted files are deleted
        for key, data in entries:
            assert cache.get_chunk(key) in (None, data)
    finally:
        cache.close()


def test_eviction_takes_the_least_recently_read_first(directory: Path) -> None:
    cache = ChunkCache(directory, BOUND)
    try:
        old = [chunk(LARGE, i) for i in range(36)]  # 2.25 MiB: fits, with the stores and WAL
        for key, data in old:
            cache.put_chunk(key, data)
        assert len(cache.chunk_keys()) == len(old)
        hot = old[:2]  # the two oldest writes, read again: now the most recently used
        for key, data in hot:
            assert cache.get_chunk(key) == data
        seed = 100
        cold = {key for key, _ in old[2:]}
        while cold & set(cache.chunk_keys()):  # write until every cold one was evicted
            assert seed < 400, "nothing was ever evicted"
            cache.put_chunk(*chunk(LARGE, seed))
            seed += 1
            keys = set(cache.chunk_keys())
            assert {key for key, _ in hot} <= keys  # the least recently used go first
        for key, data in hot:
            assert cache.get_chunk(key) == data
    finally:
        cache.close()


# ------------------------------------------------------------- the resolver's read path


def test_every_chunk_is_a_file_named_by_when_it_was_written(cache: ChunkCache) -> None:
    entries = [chunk(size, size) for size in (1, SMALL, LARGE)]
    names = cache.put_chunks(entries)
    assert sorted(names) == sorted(key for key, _ in entries)
    assert len({Path(name).parent for name in names.values()}) == 1  # written together
    for key, data in entries:
        assert (cache.layout.chunks_dir / names[key]).read_bytes() == data


def test_load_and_locate_chunks(cache: ChunkCache) -> None:
    entries = [chunk(size, size) for size in (SMALL, LARGE)]
    names = cache.put_chunks(entries)
    missing = verity_of(b"never stored")
    loaded = cache.load_chunks([entries[0][0], None, missing, entries[1][0]])
    assert loaded[1] is None and loaded[2] is None
    assert [(c.data, c.file_name) for c in (loaded[0], loaded[3]) if c] == [
        (entries[0][1], names[entries[0][0]]),
        (entries[1][1], names[entries[1][0]]),
    ]
    assert cache.locate_chunks([missing, entries[1][0]]) == {entries[1][0]: names[entries[1][0]]}


def test_chunks_of_older_caches_inside_sqlite_still_load(directory: Path) -> None:
    key, data = chunk(SMALL, 21)
    with diskcache.Cache(str(directory / "chunks"), disk_min_file_size=OLD_MIN_FILE_BYTES) as old:
        old.set(key, data)
    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        [loaded] = cache.load_chunks([key])
        assert loaded is not None and loaded.data == data and loaded.file_name is None
        assert cache.get_chunk(key) == data
    finally:
        cache.close()


def test_load_chunks_with_verify_reads_drops_a_rotted_file(directory: Path) -> None:
    key, data = chunk(LARGE, 22)
    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        name = cache.put_chunks([(key, data)])[key]
        path = cache.layout.chunks_dir / name
        path.write_bytes(b"Y" + data[1:])
        assert cache.load_chunks([key]) == [None]
        assert not cache.has_chunk(key)
    finally:
        cache.close()


def test_reads_noted_without_sqlite_count_for_eviction(directory: Path) -> None:
    """load_chunks and note_read write no access time at once; the next put_chunks does, in
    its own transaction, before it evicts: the chunks read survive, as with get_chunk."""
    cache = ChunkCache(directory, BOUND)
    try:
        old = [chunk(LARGE, i) for i in range(36)]  # 2.25 MiB: fits, with the stores and WAL
        cache.put_chunks(old)
        hot = old[:2]
        cache.load_chunks([hot[0][0]])
        cache.note_read(hot[1][0])
        seed = 100
        cold = {key for key, _ in old[2:]}
        while cold & set(cache.chunk_keys()):
            assert seed < 400, "nothing was ever evicted"
            cache.put_chunks([chunk(LARGE, seed)])
            seed += 1
            assert {key for key, _ in hot} <= set(cache.chunk_keys())
    finally:
        cache.close()


def test_noted_reads_are_written_by_flush_and_close(directory: Path) -> None:
    key, data = chunk(LARGE, 23)
    cache = ChunkCache(directory, 1 << 30)
    cache.put_chunk(key, data)

    def access_time() -> float:
        with diskcache.Cache(str(directory / "chunks")) as raw:
            [(when,)] = raw._sql("SELECT access_time FROM Cache WHERE key = ?", (key,)).fetchall()
            return float(when)

    before = access_time()
    cache.note_read(key)
    assert access_time() == before
    assert cache.flush_reads() == 1 and cache.flush_reads() == 0
    flushed = access_time()
    assert flushed > before
    cache.note_read(key)
    cache.close()
    assert access_time() > flushed


# ------------------------------------------------------------------------------- metadata


def test_metadata_is_separate_and_survives_chunk_eviction(directory: Path) -> None:
    cache = ChunkCache(directory, 1 << 20)
    try:
        empty = cache.chunk_bytes
        meta = {f"blob:sha256:{i:064x}": os.urandom(LARGE) for i in range(4)}
        for key, value in meta.items():
            cache.put_meta(key, value)
        cache.put_alias("sha256:" + "ab" * 32, "sha256:" + "cd" * 32)
        assert cache.chunk_keys() == []
        assert cache.chunk_bytes == empty  # not in the chunk store (counted, never evicted)
        for key, data in (chunk(LARGE, i) for i in range(64)):  # 4 MiB through 1 MiB
            cache.put_chunk(key, data)
        for key, value in meta.items():
            assert cache.get_meta(key) == value
            assert cache.get_chunk(key) is None  # not visible as chunks
        assert cache.get_alias("sha256:" + "ab" * 32) == "sha256:" + "cd" * 32
        assert not set(meta) & set(cache.chunk_keys())
    finally:
        cache.close()


def test_chunks_and_metadata_do_not_share_keys(cache: ChunkCache) -> None:
    key, data = chunk(SMALL, 9)
    cache.put_meta(key, b"metadata")
    cache.put_chunk(key, data)
    assert cache.get_meta(key) == b"metadata"
    assert cache.get_chunk(key) == data


# --------------------------------------------------------------------------------- sharing


def test_two_caches_on_one_directory_share_entries(directory: Path) -> None:
    first = ChunkCache(directory, 1 << 30)
    second = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        key1, data1 = chunk(LARGE, 10)
        key2, data2 = chunk(SMALL, 11)
        first.put_chunk(key1, data1)
        second.put_chunk(key2, data2)
        assert second.get_chunk(key1) == data1
        assert first.get_chunk(key2) == data2
        assert sorted(first.chunk_keys()) == sorted(second.chunk_keys()) == sorted([key1, key2])
        first.put_meta("tag:app:latest", b"sha256:x")
        assert second.get_meta("tag:app:latest") == b"sha256:x"
    finally:
        first.close()
        second.close()


def test_two_processes_share_entries(directory: Path) -> None:
    key, data = chunk(LARGE, 12)
    cache = ChunkCache(directory, 1 << 30)
    try:
        cache.put_chunk(key, data)
        child = run_child(
            """
            cache = ChunkCache(directory, 1 << 30)
            data = cache.get_chunk(sys.argv[2])
            assert data is not None and format_verity(fsverity_digest(data)) == sys.argv[2]
            cache.put_chunk(format_verity(fsverity_digest(b"from the child")), b"from the child")
            """,
            directory,
            key,
        )
        child.communicate(timeout=30)
        assert child.returncode == 0
        assert cache.get_chunk(verity_of(b"from the child")) == b"from the child"
    finally:
        cache.close()


# ---------------------------------------------------------------------------------- crashes

_CHILD_PRELUDE = """
import builtins, os, random, sys, time
from pathlib import Path
import diskcache.core
from lazyfs.cache.store import ChunkCache
from lazyfs.model.verity import format_verity, fsverity_digest
directory = Path(sys.argv[1])
def stall():
    print("stalled", flush=True)
    time.sleep(60)
"""


def run_child(body: str, directory: Path, *args: str) -> subprocess.Popen[str]:
    script = _CHILD_PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(directory), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def kill_when_stalled(child: subprocess.Popen[str]) -> None:
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "stalled\n", "the child never reached the stall"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


# The value file is half written when the writer dies.
_STALL_MID_FILE = """
real_open = builtins.open
class Stalling:
    def __init__(self, file):
        self.file = file
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        stall()
def stalling_open(path, mode="r", *args, **kwargs):
    file = real_open(path, mode, *args, **kwargs)
    return Stalling(file) if "x" in mode else file
diskcache.core.open = stalling_open
# store.py writes new chunk files itself (``_ChunkDisk.write_new``), with os.write.
real_write = os.write
def stalling_write(fd, data):
    real_write(fd, bytes(data[:1000]))  # a part only
    stall()
os.write = stalling_write
"""

# The row is inserted but its transaction is not committed when the writer dies.
_STALL_BEFORE_COMMIT = """
real_insert = diskcache.core.Cache._row_insert
def stalling_insert(self, *args):
    real_insert(self, *args)
    stall()
diskcache.core.Cache._row_insert = stalling_insert
# store.py inserts the rows of new chunks itself, all at once (``ChunkCache._insert_chunks``).
real_insert_chunks = ChunkCache._insert_chunks
def stalling_insert_chunks(self, *args):
    real_insert_chunks(self, *args)
    stall()
ChunkCache._insert_chunks = stalling_insert_chunks
"""

_PUT_ONE = """
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[2]))
ChunkCache(directory, 1 << 30).put_chunk(sys.argv[4], data)
"""


@pytest.mark.parametrize(
    ("stall", "size"),
    [
        (_STALL_MID_FILE, 4 << 20),
        (_STALL_BEFORE_COMMIT, 4 << 20),
        (_STALL_BEFORE_COMMIT, SMALL),
    ],
    ids=["mid-file", "before-commit-file", "before-commit-small"],
)
def test_writer_killed_mid_write_leaves_no_valid_entry(
    directory: Path, stall: str, size: int
) -> None:
    key, data = chunk(size, 13)
    # An earlier, complete entry must survive the crash.
    old_key, old_data = chunk(LARGE, 14)
    with_old = ChunkCache(directory, 1 << 30)
    with_old.put_chunk(old_key, old_data)
    with_old.close()

    child = run_child(stall + _PUT_ONE, directory, str(size), "13", key)
    kill_when_stalled(child)
    files = value_files(directory)
    assert len(files) == 2  # the killed writer left its value file behind, as an orphan
    if stall is _STALL_MID_FILE:
        assert min(f.stat().st_size for f in files) < LARGE  # half written

    cache = ChunkCache(directory, 1 << 30, verify_reads=True)
    try:
        assert cache.get_chunk(key) is None
        assert not cache.has_chunk(key)
        assert cache.chunk_keys() == [old_key]
        assert cache.get_chunk(old_key) == old_data
        # The cache is still writable, and the same chunk can be stored afterwards.
        cache.put_chunk(key, data)
        assert cache.get_chunk(key) == data
    finally:
        cache.close()


def test_writer_killed_at_an_arbitrary_point_leaves_only_valid_entries(directory: Path) -> None:
    child = run_child(
        """
        cache = ChunkCache(directory, 1 << 30)
        for i in range(100_000):
            size = (4 << 20) if i % 3 == 2 else (1000 + i)
            data = random.Random(i).randbytes(size)
            cache.put_chunk(format_verity(fsverity_digest(data)), data)
            print(i, flush=True)
        """,
        directory,
    )
    assert child.stdout is not None
    try:
        for _ in range(8):  # some complete writes; kill it during the next (a 4 MiB one)
            assert child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    cache = ChunkCache(directory, 1 << 30)
    try:
        keys = cache.chunk_keys()
        assert len(keys) >= 8
        for key in keys:
            data = cache.get_chunk(key)
            assert data is not None and verity_of(data) == key
    finally:
        cache.close()


def test_put_chunks_rows_are_diskcache_s_own(cache: ChunkCache) -> None:
    """put_chunks writes new chunks' files and rows itself, all at once: diskcache must read
    them as its own (values, count, size), and a chunk already stored is replaced as
    diskcache's set does."""
    entries = [chunk(size, 30 + size) for size in (1, SMALL, LARGE, 1 << 20)]
    names = cache.put_chunks([*entries, entries[0]])  # a chunk twice in one request
    assert sorted(names) == sorted(key for key, _ in entries)
    store = cache._chunks
    assert len(store) == len(entries) == len(value_files(cache.directory))
    assert cache.chunk_bytes_stored == sum(len(data) for _, data in entries)
    for key, data in entries:
        assert store.get(key) == data  # diskcache's own read
    again = cache.put_chunks([entries[1], chunk(7, 7)])
    assert again[entries[1][0]] != names[entries[1][0]]  # replaced, by diskcache's set
    assert len(value_files(cache.directory)) == len(entries) + 1  # the old file is gone
    assert cache.get_chunk(entries[1][0]) == entries[1][1]


def test_put_chunks_after_eviction_emptied_the_directory(directory: Path) -> None:
    """diskcache removes a directory its last file leaves; the next write makes it again."""
    cache = ChunkCache(directory, 1 << 30)
    try:
        first = chunk(LARGE, 40)
        cache.put_chunks([first])
        cache.drop_chunk(first[0])
        assert value_files(directory) == []
        second = chunk(LARGE, 41)
        names = cache.put_chunks([second])
        assert (cache.layout.chunks_dir / names[second[0]]).read_bytes() == second[1]
    finally:
        cache.close()


def test_put_chunks_rolled_back_leaves_no_files(
    cache: ChunkCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = chunk(SMALL, 50)
    cache.put_chunks([kept])
    disk = cache._chunks._disk
    real = disk.write_new
    calls: list[int] = []

    def full_on_second(data: bytes) -> str:
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return str(real(data))

    monkeypatch.setattr(disk, "write_new", full_on_second)
    with pytest.raises(CacheError):
        cache.put_chunks([chunk(LARGE, 51), chunk(LARGE, 52)])
    monkeypatch.undo()
    assert len(calls) == 2
    assert len(value_files(cache.directory)) == 1 and cache.chunk_keys() == [kept[0]]
