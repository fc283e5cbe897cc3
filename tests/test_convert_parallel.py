"""Converting a layer on several cores: the blob is the same on one core and on many, and the
same as the writer made before the work was shared (issue 14); workers never outlive a
conversion, failed or killed."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import anyio
import fastcdc
import pytest

from lazyfs.config import ChunkingConfig
from lazyfs.convert.converter import Converter, ConvertOptions
from lazyfs.convert.imagebuild import write_tar_image
from lazyfs.convert.stores import LayoutLocation, LayoutStore
from lazyfs.errors import LayoutError, LazyfsError, TocError
from lazyfs.formats.chunked.chunker import cut_points
from lazyfs.formats.chunked.frames import RAW, Batch
from lazyfs.formats.chunked.workers import BatchRunner
from lazyfs.formats.chunked.writer import (
    BATCH_BYTES,
    BYTES_PER_WORKER,
    ChunkedLayer,
    LayerWriter,
    write_chunked_layer,
)
from lazyfs.model.digest import Digest

# Recorded with the writer as it was before issue 14 (commit 7fce8ea, one thread pool, no
# worker processes) on the tar that write_test_tar makes.
GOLDEN_TAR_SHA256 = "59f1171a547e6f7723fb69ff906b82eaea8a92ef756db476d1fcdc47ed013a11"
GOLDEN_BLOB_SHA256 = "64a5548e9c01f64f87051230634784c9961116e7d759247f25382abef03d6359"

SMALL = ChunkingConfig(min_chunk_bytes=1024, avg_chunk_bytes=4096, max_chunk_bytes=16384)
ONE_PROCESS = ChunkingConfig(workers=1)
MTIME = 1_700_000_000
_WORDS = [b"lazyfs", b"chunk", b"frame", b"verity", b"zstd", b"layer", b"tar", b"split", b"\n"]


# --- the test tar ---------------------------------------------------------------------------------


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += rng.choice(_WORDS) + b" "
    return bytes(out[:size])


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uname = info.gname = ""
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def write_test_tar(path: Path) -> None:
    """A deterministic PAX tar of about 38 MB: hundreds of files of every size class around the
    chunk limits, text and random data, runs of zeros, files larger than a CDC window and than
    a batch, and every member type the writer maps. Only the standard library: the golden
    digests above were recorded by running this function against the old writer."""
    rng = random.Random(14)
    sizes = [0, 1, 100, 511, 512, 4096, 16383, 16384, 16385, 65536, 262144, 262145]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, _BytesReader(data))
            else:
                tar.addfile(info)

        add(_info("d", tarfile.DIRTYPE))
        for index in range(400):
            size = rng.choice(sizes) if index % 3 else rng.randint(0, 120_000)
            data = _text(rng, size) if index % 2 else rng.randbytes(size)
            add(_info(f"d/f{index:03d}"), data)
        add(_info("d/text-9m"), _text(rng, 9 << 20))
        add(_info("d/random-5m"), rng.randbytes(5 << 20))
        add(_info("d/zeros-1m"), bytes(1 << 20))
        add(_info("d/mixed"), rng.randbytes(70_000) + bytes(300_000) + _text(rng, 70_000))
        add(_info("d/link", tarfile.SYMTYPE, linkname="f001", mode=0o777))
        add(_info("d/hard", tarfile.LNKTYPE, linkname="d/f002"))
        add(_info("d/" + "long" * 40), b"a long name")
        add(_info("d/caf\udce9"), b"not UTF-8")
        xattrs = {"SCHILY.xattr.user.k": "v", "mtime": "1700000000.5"}
        add(_info("d/xattr", pax_headers=xattrs), b"xattr")
        add(_info("dev", tarfile.DIRTYPE))
        add(_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666))
        add(_info("d/fifo", tarfile.FIFOTYPE))
        add(_info("d/last"), _text(rng, 40_000))


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        piece = self._data[self._offset : end]
        self._offset += len(piece)
        return piece


@pytest.fixture(scope="module")
def test_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parallel") / "layer.tar"
    write_test_tar(path)
    return path


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(
    tar: Path,
    out: Path,
    config: ChunkingConfig = ONE_PROCESS,
    batch_bytes: int = BATCH_BYTES,
    bytes_per_worker: int = BYTES_PER_WORKER,
) -> ChunkedLayer:
    writer = LayerWriter(config, None, batch_bytes=batch_bytes, bytes_per_worker=bytes_per_worker)
    with out.open("wb") as blob:
        return writer.write(tar, blob, Digest("sha256", "0" * 64))


# --- the blob does not depend on the workers ------------------------------------------------------


def test_one_process_writes_what_the_writer_before_issue_14_wrote(
    test_tar: Path, tmp_path: Path
) -> None:
    if sha256_file(test_tar) != GOLDEN_TAR_SHA256:
        pytest.skip("this Python's tarfile writes another test tar than the golden one")
    layer = convert(test_tar, tmp_path / "one.zst")
    assert sha256_file(tmp_path / "one.zst") == GOLDEN_BLOB_SHA256
    assert str(layer.digest) == "sha256:" + GOLDEN_BLOB_SHA256


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("config", [ChunkingConfig(), SMALL], ids=["default", "small-chunks"])
def test_parallel_blob_is_byte_identical_to_one_process(
    test_tar: Path, tmp_path: Path, workers: int, config: ChunkingConfig
) -> None:
    single = convert(test_tar, tmp_path / "single.zst", ChunkingConfig(**_fields(config, 1)))
    # Small batches: files straddle batches, and large ones are hashed outside them.
    parallel_config = ChunkingConfig(**_fields(config, workers))
    writer = LayerWriter(parallel_config, None, bytes_per_worker=1)
    assert writer.worker_count(test_tar.stat().st_size) == workers
    parallel = convert(test_tar, tmp_path / "parallel.zst", parallel_config, 256 << 10, 1)
    assert (tmp_path / "parallel.zst").read_bytes() == (tmp_path / "single.zst").read_bytes()
    assert parallel.toc == single.toc
    assert parallel.annotations == single.annotations
    assert parallel.stats == single.stats


def _fields(config: ChunkingConfig, workers: int) -> dict[str, int]:
    return {
        "min_chunk_bytes": config.min_chunk_bytes,
        "avg_chunk_bytes": config.avg_chunk_bytes,
        "max_chunk_bytes": config.max_chunk_bytes,
        "zstd_level": config.zstd_level,
        "workers": workers,
    }


def test_write_chunked_layer_on_every_core_matches_the_golden_blob(
    test_tar: Path, tmp_path: Path
) -> None:
    if sha256_file(test_tar) != GOLDEN_TAR_SHA256:
        pytest.skip("this Python's tarfile writes another test tar than the golden one")
    progress: list[int] = []
    layer = write_chunked_layer(
        test_tar, tmp_path / "all.zst", ChunkingConfig(workers=2), on_progress=progress.append
    )
    assert str(layer.digest) == "sha256:" + GOLDEN_BLOB_SHA256
    assert progress == sorted(progress) and progress[-1] == test_tar.stat().st_size


def test_worker_count(test_tar: Path, tmp_path: Path) -> None:
    size = test_tar.stat().st_size
    cpus = len(os.sched_getaffinity(0))
    assert LayerWriter(ChunkingConfig(), None, bytes_per_worker=1).worker_count(size) == cpus
    assert LayerWriter(ChunkingConfig(workers=5), None).worker_count(size) == size // (8 << 20)
    assert LayerWriter(ChunkingConfig(workers=5), None).worker_count(4 << 20) == 1


def test_manifest_digest_is_the_same_for_any_number_of_workers(
    test_tar: Path, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    write_tar_image(source, "v1", [test_tar], compression="none")

    def convert_image(workers: int) -> str:
        dest = tmp_path / f"dest-{workers}"
        options = ConvertOptions(chunking=ChunkingConfig(workers=workers), work_dir=tmp_path)
        converter = Converter(
            LayoutStore(LayoutLocation(source, "v1"), create=False),
            LayoutStore(LayoutLocation(dest, "v1"), create=True),
            options,
        )
        return anyio.run(converter.run).digest

    assert convert_image(1) == convert_image(2)


# --- chunk boundaries in windows ------------------------------------------------------------------


@pytest.mark.parametrize("config", [ChunkingConfig(), SMALL], ids=["default", "small-chunks"])
@pytest.mark.parametrize("window", [0, 40_000, 1 << 20])
def test_chunk_boundaries_in_windows_equal_one_fastcdc_pass(
    config: ChunkingConfig, window: int
) -> None:
    rng = random.Random(window)
    data = rng.randbytes(3_000_000) + bytes(200_000) + _text(rng, 1_000_000)
    expected = [
        (chunk.offset, chunk.length)
        for chunk in fastcdc.fastcdc(
            data, config.min_chunk_bytes, config.avg_chunk_bytes, config.max_chunk_bytes
        )
    ]
    view = memoryview(data)
    reads: list[int] = []

    def read(offset: int, length: int) -> memoryview:
        reads.append(length)
        return view[offset : offset + length]

    assert list(cut_points(len(data), read, config, window)) == expected
    assert max(reads) <= max(window, 2 * config.max_chunk_bytes)


def test_payload_up_to_the_minimum_chunk_is_one_chunk_and_not_read() -> None:
    def read(offset: int, length: int) -> memoryview:
        raise AssertionError("read")

    assert list(cut_points(SMALL.min_chunk_bytes, read, SMALL)) == [(0, SMALL.min_chunk_bytes)]
    assert list(cut_points(0, read, SMALL)) == []


# --- workers: errors, and never a stray process ---------------------------------------------------


def child_pids() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(pid) for pid in (task / "children").read_text().split())
    return pids


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_worker_errors_are_lazyfs_errors_and_stop_the_workers(tmp_path: Path) -> None:
    before = child_pids()
    batch = Batch(str(tmp_path / "missing.tar"), 0, 1, ((RAW, 0, 1),), 3)
    runner = BatchRunner[int](3)  # two workers, and this process
    with pytest.raises(LayoutError, match="cannot read the layer tar"), runner:
        pids = runner.process_ids
        assert len(pids) == 2
        runner.submit(batch, 0)
        runner.drain()
    assert all(gone(pid) for pid in pids)
    assert child_pids() <= before


def test_a_killed_worker_fails_the_conversion(tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    tar.write_bytes(b"x" * 4096)
    batch = Batch(str(tar), 0, 4096, ((RAW, 0, 4096),), 3)
    runner = BatchRunner[int](3)  # two workers, and this process
    with pytest.raises(LazyfsError, match="worker process"), runner:
        pids = runner.process_ids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for tag in range(8):
            runner.submit(batch, tag)
        runner.drain()
    assert all(gone(pid) for pid in pids)


def test_a_failed_conversion_leaves_no_process(test_tar: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(test_tar.read_bytes())
    with tarfile.open(bad, "a", format=tarfile.PAX_FORMAT) as tar:  # a sparse file at the end
        sparse = _info("sparse", pax_headers={"GNU.sparse.map": "0,3", "GNU.sparse.size": "10"})
        sparse.size = 3
        tar.addfile(sparse, _BytesReader(b"abc"))
    before = child_pids()
    with pytest.raises(TocError, match="sparse"):
        convert(bad, tmp_path / "bad.zst", ChunkingConfig(workers=2), bytes_per_worker=1)
    assert child_pids() <= before


def test_workers_exit_when_the_writer_is_killed() -> None:
    code = (
        "import os, signal\n"
        "from lazyfs.formats.chunked.workers import BatchRunner\n"
        "runner = BatchRunner(3).__enter__()\n"
        "print(*runner.process_ids, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL
    pids = [int(pid) for pid in result.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in pids)
