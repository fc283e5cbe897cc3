"""Mounting images lazyfs did not convert: skopeo's zstd:chunked, plain layers, mixes."""

from __future__ import annotations

import errno
from pathlib import Path

import diskcache
import pytest
import zstandard
from imagebuild import build_big_image, build_feature_image
from lazyfs_run import mounted, run_lazyfs, stats
from oracles import assert_trees_equal, require_tool, skopeo_copy, tree_snapshot, umoci_unpack

from lazyfs.convert.imagebuild import BuiltImage, directory, regular_file, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.chunked.toc import (
    LEGACY_TOC_POSITION_ANNOTATION,
    Toc,
    file_chunks,
    group_file_entries,
    parse_toc_position,
)
from lazyfs.model.manifests import Manifest
from lazyfs.model.verity import format_verity, fsverity_digest
from lazyfs.registry.localserver import LocalRegistry


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_feature_image(tmp_path_factory.mktemp("feature") / "oci", "v1")


def _skopeo_chunked(source: BuiltImage, out: Path) -> OciLayout:
    require_tool("skopeo")
    skopeo_copy(source.reference, f"oci:{out}:v1", "--dest-compress-format", "zstd:chunked")
    return OciLayout(out)


def _manifest(layout: OciLayout) -> Manifest:
    descriptor = layout.resolve("v1")
    return Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)


def test_skopeo_zstd_chunked_mounts_lazily(
    feature: BuiltImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    chunked = _skopeo_chunked(feature, tmp_path / "zc")
    ref = f"{registry.host}/skopeo-chunked:v1"
    skopeo_copy(f"oci:{chunked.path}:v1", f"docker://{ref}")
    expected = tree_snapshot(umoci_unpack(feature.layout.path, "v1", tmp_path / "unpacked"))
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert_trees_equal(expected, tree_snapshot(mnt))
        counters = stats(mnt)
    assert counters["plain_layers"] == 0
    assert all(layer["lazy"] for layer in counters["layers"])
    cache = diskcache.Cache(str(tmp_path / "cache" / "chunks"))
    try:  # cached by fs-verity digest even though the TOC has only sha256
        keys = list(cache.iterkeys())
        assert keys
        for key in keys[:50]:
            assert format_verity(fsverity_digest(cache[key])) == key
    finally:
        cache.close()


def test_skopeo_zstd_chunked_small_read_is_small(tmp_path: Path) -> None:
    big = build_big_image(tmp_path / "big", "v1", 40 << 20)
    chunked = _skopeo_chunked(big, tmp_path / "zc")
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/skopeo-big:v1"
        skopeo_copy(f"oci:{chunked.path}:v1", f"docker://{ref}")
        before = registry.access_log_summary().bytes_written
        layers_bytes = sum(layer.size for layer in _manifest(chunked).layers)
        small = next(
            e for e in big.layers[0].entries if e.type == "file" and 2000 < len(e.data) < 8000
        )
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            assert (mnt / small.path).read_bytes() == small.data
        fetched = registry.access_log_summary().bytes_written - before
    assert fetched < 0.05 * layers_bytes, (fetched, layers_bytes)


def test_tampered_foreign_chunk_gives_eio(tmp_path: Path) -> None:
    layers = [
        [
            directory("d"),
            regular_file("d/victim", bytes(range(256)) * 2000),
            regular_file("d/ok", b"ok\n"),
        ]
    ]
    built = write_image(tmp_path / "src", "v1", layers)
    chunked = _skopeo_chunked(built, tmp_path / "zc")
    layer = _manifest(chunked).layers[0]
    section = parse_toc_position(layer.annotations[LEGACY_TOC_POSITION_ANNOTATION])
    compressed = chunked.read_blob(layer.digest)[section.offset : section.end]
    toc = Toc.parse(
        zstandard.ZstdDecompressor().decompress(
            compressed, max_output_size=section.uncompressed_length
        )
    )
    victim = next(g for g in group_file_entries(toc.entries) if g[0].name.endswith("d/victim"))
    chunk = file_chunks(victim)[0]
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/tamper-foreign:v1"
        skopeo_copy(f"oci:{chunked.path}:v1", f"docker://{ref}")
        hex_ = layer.digest.hex
        blob = registry.storage_dir / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
        raw = bytearray(blob.read_bytes())
        raw[(chunk.blob_offset + chunk.blob_end) // 2] ^= 0x5A
        blob.write_bytes(bytes(raw))
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            with pytest.raises(OSError) as caught:
                (mnt / "d/victim").read_bytes()
            assert caught.value.errno == errno.EIO
            assert (mnt / "d/ok").read_bytes() == b"ok\n"
    cache = diskcache.Cache(str(tmp_path / "cache" / "chunks"))
    try:
        for key in cache.iterkeys():
            assert format_verity(fsverity_digest(cache[key])) == key
    finally:
        cache.close()


@pytest.mark.parametrize("compression", ["gzip", "none", "zstd"])
def test_plain_layers_mount_and_match_umoci(
    compression: str, feature: BuiltImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    ref = f"{registry.host}/plain-{compression}:v1"
    skopeo_args = (
        []
        if compression == "gzip"
        else ["--dest-compress-format", compression]
        if compression == "zstd"
        else ["--dest-decompress"]
    )
    skopeo_copy(feature.reference, f"docker://{ref}", *skopeo_args)
    expected = tree_snapshot(umoci_unpack(feature.layout.path, "v1", tmp_path / "unpacked"))
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert_trees_equal(expected, tree_snapshot(mnt))
        counters = stats(mnt)
    assert counters["plain_layers"] == len(feature.layers)
    assert not any(layer["lazy"] for layer in counters["layers"])


def test_mixed_plain_and_lazy_layers_and_offline_remount(
    feature: BuiltImage, tmp_path: Path
) -> None:
    run_lazyfs("convert", "-q", feature.reference, f"oci:{tmp_path / 'chunked'}:v1")
    plain, lazy = OciLayout(feature.layout.path), OciLayout(tmp_path / "chunked")
    mixed_layers = [_manifest(lazy).layers[0], *feature.manifest.layers[1:]]
    for layer in mixed_layers:
        source = lazy if layer in _manifest(lazy).layers else plain
        if not plain.has_blob(layer.digest):
            plain.add_blob_bytes(source.read_blob(layer.digest))
    manifest = feature.manifest.with_layers(mixed_layers)
    data = manifest.to_bytes()
    from lazyfs.model.manifests import Descriptor

    plain.tag(Descriptor(manifest.media_type, plain.add_blob_bytes(data), len(data)), "mixed")
    expected = tree_snapshot(umoci_unpack(feature.layout.path, "v1", tmp_path / "unpacked"))
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/mixed:v1"
        skopeo_copy(f"oci:{plain.path}:mixed", f"docker://{ref}")
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            assert_trees_equal(expected, tree_snapshot(mnt))
            lazies = [layer["lazy"] for layer in stats(mnt)["layers"]]
    assert lazies == [True] + [False] * (len(mixed_layers) - 1)
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--read-timeout", "20") as mnt:
        assert_trees_equal(expected, tree_snapshot(mnt))
        assert stats(mnt)["offline"] is True


def test_estargz_mounts_lazily_and_matches_umoci(tmp_path: Path) -> None:
    from estargz_build import write_estargz_image
    from imagebuild import feature_layers

    built = write_estargz_image(
        tmp_path / "src", "v1", feature_layers(), chunk_size=64 << 10, min_chunk_size=4096
    )
    unpacked = tree_snapshot(umoci_unpack(built.image.layout.path, "v1", tmp_path / "unpacked"))
    # eStargz's own metadata entries are hidden, as stargz-snapshotter hides them.
    hidden = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}
    expected = {path: info for path, info in unpacked.items() if path not in hidden}
    assert len(expected) >= len(unpacked) - 2
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/estargz:v1"
        skopeo_copy(f"oci:{built.image.layout.path}:v1", f"docker://{ref}")
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            assert_trees_equal(expected, tree_snapshot(mnt))
            counters = stats(mnt)
        assert counters["plain_layers"] == 0
        assert counters["verification_failures"] == 0
        # offline remount from the cache
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
            assert_trees_equal(expected, tree_snapshot(mnt))
