"""The warm read path's pieces: ChunkFiles (which file holds a chunk, open descriptors, reads
without waiting) and FileReaders (reader threads and their hand-off to the event loop)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from lazyfs.cache.chunkfiles import ChunkFiles, read_blocking
from lazyfs.mount.filereaders import FileReaders

pytestmark = pytest.mark.anyio


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    for index in range(8):
        (tmp_path / "d" / f"f{index}.val").write_bytes(bytes([index]) * 10_000)
    return tmp_path


@pytest.fixture
def files(directory: Path) -> Iterator[ChunkFiles]:
    known = ChunkFiles(directory, max_open=3, max_entries=6)
    for index in range(8):
        known.learn(f"k{index}", f"v{index}", f"d/f{index}.val")
    yield known
    known.close()


def _never_checked(data: bytes) -> str:
    raise AssertionError("not a whole read")


def test_entries_and_descriptors_are_bounded(files: ChunkFiles) -> None:
    assert len(files) == 6  # k0 and k1 were the least recently learned
    assert files.entry("k0") is None and files.entry("k7") is not None
    for index in range(2, 8):
        dest = bytearray(10)
        got = files.read_nowait(f"k{index}", 5, memoryview(dest))
        assert got in (0, 10)  # 0: the open or the read would have waited
        if got:
            assert dest == bytes([index]) * 10
    assert files.open_count <= 3
    assert files.read_nowait("k0", 0, memoryview(bytearray(1))) is None  # unknown


def test_a_blocking_read_fills_in_and_keeps_its_descriptor(files: ChunkFiles) -> None:
    out = bytearray(20)
    job = files.job("k5", 9_990, memoryview(out)[5:15])
    assert job is not None and job.fd < 0
    read_blocking(files.dir_fd, [job], _never_checked)
    assert job.done and not job.gone and job.new_fd >= 0
    files.settle([job])
    assert out == bytes(5) + bytes([5]) * 10 + bytes(5)  # just the bytes asked for
    assert files.open_count == 1
    again = files.job("k5", 0, memoryview(bytearray(1)))
    assert again is not None and again.fd >= 0  # the kept descriptor, lent
    files.settle([again])


def test_a_short_or_missing_file_is_gone_and_forgotten(files: ChunkFiles, directory: Path) -> None:
    short = files.job("k6", 9_000, memoryview(bytearray(2000)))  # 1000 bytes past the end
    (directory / "d" / "f7.val").unlink()
    missing = files.job("k7", 0, memoryview(bytearray(10)))
    assert short is not None and missing is not None
    read_blocking(files.dir_fd, [short, missing], _never_checked)
    assert short.gone and missing.gone
    files.settle([short, missing])
    assert files.entry("k6") is None and files.entry("k7") is None
    assert files.open_count == 0  # the descriptor opened for the short read was closed


def test_a_whole_read_is_checked(files: ChunkFiles) -> None:
    good = files.job("k3", 0, memoryview(b""), whole=True, size=10_000)
    bad = files.job("k4", 0, memoryview(b""), whole=True, size=10_000)
    assert good is not None and bad is not None
    read_blocking(files.dir_fd, [good, bad], lambda data: f"v{data[0]}" if data[0] == 3 else "x")
    assert good.done and good.data == bytes([3]) * 10_000
    assert bad.gone and bad.data is None
    files.settle([good, bad])
    assert files.entry("k4") is None


def test_a_descriptor_lent_to_a_thread_is_closed_only_when_given_back(files: ChunkFiles) -> None:
    dest = memoryview(bytearray(10))
    first = files.job("k2", 0, dest)
    assert first is not None
    read_blocking(files.dir_fd, [first], _never_checked)
    files.settle([first])  # k2 is open now
    lent = files.job("k2", 0, dest)
    assert lent is not None and lent.fd >= 0
    files.forget("k2")  # while a thread may be reading it
    os.fstat(lent.fd)  # still open
    read_blocking(files.dir_fd, [lent], _never_checked)
    assert lent.done
    files.settle([lent])
    with pytest.raises(OSError):
        os.fstat(lent.fd)


def test_sweep_closes_files_that_were_deleted(files: ChunkFiles, directory: Path) -> None:
    jobs = [files.job(f"k{i}", 0, memoryview(bytearray(1))) for i in (5, 6)]
    read_blocking(files.dir_fd, [j for j in jobs if j], _never_checked)
    files.settle([j for j in jobs if j])
    assert files.open_count == 2
    (directory / "d" / "f5.val").unlink()
    assert files.sweep() == 1
    assert files.entry("k5") is None and files.entry("k6") is not None


# ----------------------------------------------------------------------------- FileReaders


async def test_readers_run_work_in_another_thread_and_finish_on_the_loop() -> None:
    readers = FileReaders()
    seen: list[str] = []
    loop_thread = threading.get_ident()
    await readers.run(lambda: seen.append(threading.current_thread().name), lambda: None)
    assert seen and seen[0].startswith("lazyfs file reader")
    finished_on: list[int] = []
    await readers.run(lambda: None, lambda: finished_on.append(threading.get_ident()))
    assert finished_on == [loop_thread]
    assert readers.pending == 0


async def test_many_waiting_reads_all_finish() -> None:
    readers = FileReaders()
    done: list[int] = []

    async def one(index: int) -> None:
        await readers.run(lambda: time.sleep(0.001 * (index % 5)), lambda: done.append(index))

    async with anyio.create_task_group() as tasks:
        for index in range(50):
            tasks.start_soon(one, index)
    assert sorted(done) == list(range(50))


async def test_a_poll_never_takes_the_wake_up_of_a_waiting_read() -> None:
    """The read waiting on the pipe must still end when another read polls first."""
    readers = FileReaders()
    release = threading.Event()
    finished = anyio.Event()

    async def waiting() -> None:
        await readers.run(release.wait, lambda: None)
        finished.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(waiting)
        await anyio.sleep(0.05)  # it waits on the pipe now
        release.set()
        await anyio.sleep(0.05)  # its job is done
        readers.poll()  # another read starts
        with anyio.fail_after(5):
            await finished.wait()


async def test_a_cancelled_wait_leaves_its_job_to_be_finished_later() -> None:
    readers = FileReaders()
    release = threading.Event()
    finished: list[str] = []
    with anyio.move_on_after(0.05):
        await readers.run(release.wait, lambda: finished.append("first"))
    assert finished == [] and readers.pending == 1
    release.set()
    with anyio.fail_after(5):  # its thread has reported it done, and nobody has finished it
        while not readers._completions.done:
            await anyio.sleep(0.005)
    await readers.run(lambda: None, lambda: finished.append("second"))
    assert "first" in finished  # finished by the next read, on the loop
    await anyio.sleep(0.05)
    readers.poll()
    assert sorted(finished) == ["first", "second"] and readers.pending == 0


async def test_a_waiting_read_takes_over_the_pipe_when_the_first_is_cancelled() -> None:
    readers = FileReaders()
    slow, quick = threading.Event(), threading.Event()
    results: list[str] = []

    async def second() -> None:
        await readers.run(quick.wait, lambda: results.append("quick"))

    async with anyio.create_task_group() as tasks:
        with anyio.move_on_after(0.05):
            tasks.start_soon(second)  # waits behind the first read, which waits on the pipe
            await readers.run(slow.wait, lambda: results.append("slow"))
        quick.set()
        with anyio.fail_after(5):
            while "quick" not in results:
                await anyio.sleep(0.01)
    slow.set()
