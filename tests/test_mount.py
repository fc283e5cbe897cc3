"""``lazyfs mount`` end to end: a real registry, real FUSE mounts, umoci as the oracle."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import diskcache
import pytest
from imagebuild import build_big_image, build_feature_image, layout_manifest, layout_tocs
from lazyfs_run import mounted, run_lazyfs, settled_stats, stats, wait_gone
from oracles import assert_trees_equal, tree_snapshot, umoci_unpack

from lazyfs.convert.imagebuild import BuiltImage, directory, regular_file, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.chunked.toc import (
    Toc,
    file_chunks,
    group_file_entries,
)
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.mount.mountinfo import is_mounted
from lazyfs.registry.localserver import LocalRegistry

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_feature_image(tmp_path_factory.mktemp("feature") / "oci", "v1")


@pytest.fixture(scope="module")
def feature_ref(feature: BuiltImage, registry: LocalRegistry) -> str:
    target = f"{registry.host}/mount-feature:chunked"
    run_lazyfs("convert", "-q", feature.reference, target)
    return target


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_big_image(tmp_path_factory.mktemp("big") / "oci", "v1", 110 << 20)


@pytest.fixture(scope="module")
def big_converted(big: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    out = tmp_path_factory.mktemp("big-chunked") / "oci"
    run_lazyfs("convert", "-q", big.reference, f"oci:{out}:v1")
    return OciLayout(out)


def _push(layout: OciLayout, ref: str) -> None:
    from oracles import skopeo_copy

    skopeo_copy(f"oci:{layout.path}:v1", f"docker://{ref}")


def test_mounted_tree_equals_umoci_unpack(
    feature: BuiltImage, feature_ref: str, tmp_path: Path
) -> None:
    expected = tree_snapshot(umoci_unpack(feature.layout.path, "v1", tmp_path / "unpacked"))
    with mounted(feature_ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        actual = tree_snapshot(mnt)
        counters = stats(mnt)
    assert_trees_equal(expected, actual)
    assert counters["verification_failures"] == 0
    assert counters["chunks_fetched"] > 0


def test_read_only_and_statfs(feature_ref: str, tmp_path: Path) -> None:
    with mounted(feature_ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        for attempt in (
            lambda: (mnt / "new-file").write_bytes(b"x"),
            lambda: (mnt / "etc").rename(mnt / "etc2"),
            lambda: os.mkdir(mnt / "newdir"),
        ):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS
        assert os.statvfs(mnt).f_namemax == 255
        shown = run_lazyfs("stats", str(mnt)).stdout
        assert "bytes_fetched" in shown


def test_one_small_file_fetches_under_two_percent(
    big: BuiltImage, big_converted: OciLayout, tmp_path: Path
) -> None:
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/big:v1"
        _push(big_converted, ref)
        before = registry.access_log_summary().bytes_written
        image_bytes = sum(layer.size for layer in layout_manifest(big_converted).layers)
        small = next(
            e for e in big.layers[0].entries if e.type == "file" and 1000 < len(e.data) < 8000
        )
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            assert (mnt / small.path).read_bytes() == small.data
            own = stats(mnt)["bytes_fetched"]
        fetched = registry.access_log_summary().bytes_written - before
    print(
        f"read {len(small.data)} B; registry sent {fetched} B of {image_bytes} B "
        f"({100 * fetched / image_bytes:.3f}%)"
    )
    assert fetched < 0.02 * image_bytes
    assert own <= fetched


def _expected_chunks(tocs: list[Toc], paths: set[str]) -> set[str]:
    keys: set[str] = set()
    for toc in tocs:
        for group in group_file_entries(toc.entries):
            if group[0].type == "reg" and group[0].name in paths:
                keys.update(c.verity for c in file_chunks(group) if not c.zeros)
    return keys


def test_32_concurrent_readers_fetch_each_chunk_once(
    big: BuiltImage, big_converted: OciLayout, registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = f"{registry.host}/big-concurrent:v1"
    _push(big_converted, ref)
    top = {}
    for layer in big.layers:  # the last layer to write a path wins
        top.update({e.path: e.data for e in layer.entries if e.type == "file"})
    chosen = sorted(top)[:: max(1, len(top) // 120)]
    errors: list[str] = []
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:

        def reader(offset: int) -> None:
            for path in chosen[offset::4] + chosen[:8]:
                if (mnt / path).read_bytes() != top[path]:
                    errors.append(path)

        threads = [threading.Thread(target=reader, args=(i % 4,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counters = settled_stats(mnt)
    assert errors == []
    expected = _expected_chunks(layout_tocs(big_converted), set(chosen))
    cache = diskcache.Cache(str(tmp_path / "cache" / "chunks"))
    try:
        cached = set(cache.iterkeys())
    finally:
        cache.close()
    assert expected <= cached
    # No chunk was fetched twice: one fetch per distinct cached chunk (readahead included).
    assert counters["chunks_fetched"] == len(cached)
    assert counters["verification_failures"] == 0


def _registry_blob_path(registry: LocalRegistry, digest: str) -> Path:
    hex_ = digest.split(":", 1)[1]
    return registry.storage_dir / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def test_tampered_chunk_gives_eio_and_is_never_cached(tmp_path: Path) -> None:
    layers = [
        [
            directory("d"),
            regular_file("d/victim", os.urandom(300_000)),
            regular_file("d/bystander", b"fine\n" * 1000),
        ]
    ]
    built = write_image(tmp_path / "src", "v1", layers)
    run_lazyfs("convert", "-q", built.reference, f"oci:{tmp_path / 'chunked'}:v1")
    layout = OciLayout(tmp_path / "chunked")
    layer = layout_manifest(layout).layers[0]
    victim = next(
        g for g in group_file_entries(layout_tocs(layout)[0].entries) if g[0].name == "d/victim"
    )
    chunk = file_chunks(victim)[1]
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/tamper:v1"
        _push(layout, ref)
        blob = _registry_blob_path(registry, str(layer.digest))
        raw = bytearray(blob.read_bytes())
        raw[(chunk.blob_offset + chunk.blob_end) // 2] ^= 0x55
        blob.write_bytes(bytes(raw))
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            with pytest.raises(OSError) as caught:
                (mnt / "d/victim").read_bytes()
            assert caught.value.errno == errno.EIO
            assert (mnt / "d/bystander").read_bytes() == b"fine\n" * 1000
            assert stats(mnt)["verification_failures"] >= 1
    cache = diskcache.Cache(str(tmp_path / "cache" / "chunks"))
    try:
        assert chunk.verity not in cache
        for key in cache.iterkeys():
            assert format_verity(fsverity_digest(cache[key])) == key  # every cached byte verified
    finally:
        cache.close()


def test_remount_offline_from_cache(feature: BuiltImage, tmp_path: Path) -> None:
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/offline:v1"
        run_lazyfs("convert", "-q", feature.reference, ref)
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            online = tree_snapshot(mnt)  # reads every file
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--read-timeout", "20") as mnt:
        offline = tree_snapshot(mnt)
        assert stats(mnt)["offline"] is True
    assert_trees_equal(online, offline)


def test_external_fusermount_ends_the_daemon(feature_ref: str, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_lazyfs("mount", "--cache-dir", str(tmp_path / "cache"), feature_ref, str(mnt))
    pid = stats(mnt)["pid"]
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    wait_gone(pid)
    assert not is_mounted(mnt)


def test_umount_ends_the_daemon(feature_ref: str, tmp_path: Path) -> None:
    """umount releases the image; the service it started on demand then exits (idle)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_lazyfs("mount", "--cache-dir", str(tmp_path / "cache"), feature_ref, str(mnt))
    pid = stats(mnt)["pid"]
    run_lazyfs("umount", str(mnt))
    assert not is_mounted(mnt)
    wait_gone(pid, timeout_s=10)
    assert not is_mounted(mnt)


def test_mount_errors_are_one_line(registry: LocalRegistry, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    missing = run_lazyfs(
        "mount",
        "--cache-dir",
        str(tmp_path / "c"),
        f"{registry.host}/nope:v1",
        str(tmp_path / "mnt"),
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("lazyfs: error: ")
    assert not is_mounted(tmp_path / "mnt")
    not_dir = run_lazyfs("mount", f"{registry.host}/nope:v1", str(tmp_path / "absent"), check=False)
    assert not_dir.returncode == 2


def test_hash_of_big_file_through_mount(
    big: BuiltImage, big_converted: OciLayout, registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = f"{registry.host}/big-seq:v1"
    _push(big_converted, ref)
    biggest = max(
        (e for layer in big.layers for e in layer.entries if e.type == "file"),
        key=lambda e: len(e.data),
    )
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        digest = hashlib.sha256((mnt / biggest.path).read_bytes()).hexdigest()
    assert digest == hashlib.sha256(biggest.data).hexdigest()
