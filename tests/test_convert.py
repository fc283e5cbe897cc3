"""``lazyfs convert`` end to end: a real registry, skopeo and umoci as oracles."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from imagebuild import build_feature_image
from lazyfs_run import run_lazyfs
from oracles import (
    assert_trees_equal,
    require_tool,
    run_tool,
    skopeo_copy,
    tree_snapshot,
    umoci_unpack,
)

from lazyfs.convert.imagebuild import BuiltImage, directory, regular_file, write_image
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.chunked.toc import (
    FOOTER_BYTES,
    SKIPPABLE_FRAME_MAGIC,
    TOC_CHECKSUM_ANNOTATION,
    TOC_POSITION_ANNOTATION,
    Footer,
    Toc,
    file_chunks,
    group_file_entries,
    parse_toc_position,
)
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_INDEX, OCI_LAYER_TAR_ZSTD, Descriptor, Index, Manifest
from lazyfs.model.platform import Platform
from lazyfs.registry.localserver import LocalRegistry


@pytest.fixture(scope="module")
def feature(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_feature_image(tmp_path_factory.mktemp("feature") / "oci", "v1")


@pytest.fixture(scope="module")
def converted(feature: BuiltImage, registry: LocalRegistry) -> str:
    target = f"{registry.host}/feature:chunked"
    run_lazyfs("convert", "-q", feature.reference, target)
    return target


@pytest.fixture(scope="module")
def converted_layout(converted: str, tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """The converted image pulled back by skopeo, an independent client."""
    out = tmp_path_factory.mktemp("pulled") / "oci"
    skopeo_copy(f"docker://{converted}", f"oci:{out}:v1")
    return OciLayout(out)


def _manifest(layout: OciLayout, tag: str = "v1") -> Manifest:
    descriptor = layout.resolve(tag)
    return Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)


def _toc(layout: OciLayout, layer: Descriptor) -> Toc:
    section = parse_toc_position(layer.annotations[TOC_POSITION_ANNOTATION])
    blob = layout.read_blob(layer.digest)
    compressed = blob[section.offset : section.end]
    assert (
        "sha256:" + hashlib.sha256(compressed).hexdigest()
        == layer.annotations[TOC_CHECKSUM_ANNOTATION]
    )
    return Toc.parse(
        zstandard.ZstdDecompressor().decompress(
            compressed, max_output_size=section.uncompressed_length
        )
    )


def test_skopeo_and_umoci_unpack_the_same_tree(
    feature: BuiltImage, converted_layout: OciLayout, tmp_path: Path
) -> None:
    source_tree = tree_snapshot(umoci_unpack(feature.layout.path, "v1", tmp_path / "source"))
    converted_tree = tree_snapshot(
        umoci_unpack(converted_layout.path, "v1", tmp_path / "converted")
    )
    assert_trees_equal(source_tree, converted_tree)


def test_layers_are_zstd_chunked_and_decompress_to_the_source_tar(
    feature: BuiltImage, converted_layout: OciLayout, tmp_path: Path
) -> None:
    zstd = require_tool("zstd")
    manifest = _manifest(converted_layout)
    assert len(manifest.layers) == len(feature.layers)
    for built, layer in zip(feature.layers, manifest.layers, strict=True):
        assert layer.media_type == OCI_LAYER_TAR_ZSTD
        path = converted_layout.blob_path(layer.digest)
        # The zstd CLI, a standard decompressor, skips the TOC, tar-split and footer frames.
        tar = subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
        assert Digest.of(tar) == built.diff_id
        blob = path.read_bytes()
        assert blob[-FOOTER_BYTES - 8 : -FOOTER_BYTES - 4] == SKIPPABLE_FRAME_MAGIC
        footer = Footer.parse(blob[-FOOTER_BYTES:])
        assert footer.toc == parse_toc_position(layer.annotations[TOC_POSITION_ANNOTATION])


def test_every_chunk_frame_decompresses_to_its_digest(converted_layout: OciLayout) -> None:
    for layer in _manifest(converted_layout).layers:
        blob = converted_layout.read_blob(layer.digest)
        toc = _toc(converted_layout, layer)
        for group in group_file_entries(toc.entries):
            for chunk in file_chunks(group) if group[0].type == "reg" else []:
                data = (
                    zstandard.ZstdDecompressor()
                    .decompressobj()
                    .decompress(blob[chunk.blob_offset : chunk.blob_end])
                )
                assert len(data) == chunk.size
                assert "sha256:" + hashlib.sha256(data).hexdigest() == chunk.sha256
                assert chunk.verity.startswith("sha256:")


def test_toc_verity_equals_fsverity_cli(converted_layout: OciLayout, tmp_path: Path) -> None:
    fsverity = require_tool("fsverity")
    checked = 0
    for index, layer in enumerate(_manifest(converted_layout).layers):
        out = tmp_path / f"layer{index}"
        blob = converted_layout.blob_path(layer.digest)
        tar = (
            zstandard.ZstdDecompressor()
            .decompressobj(read_across_frames=True)
            .decompress(blob.read_bytes())
        )
        (tmp_path / f"layer{index}.tar").write_bytes(tar)
        with tarfile.open(tmp_path / f"layer{index}.tar") as archive:
            archive.extractall(out, filter="fully_trusted")
        entries = [
            e for e in _toc(converted_layout, layer).entries if e.type == "reg" and e.size > 0
        ]
        paths = [str(out / e.name) for e in entries]
        if not paths:
            continue
        printed = run_tool([fsverity, "digest", *paths]).splitlines()
        expected = {line.split(" ", 1)[1]: line.split(" ", 1)[0] for line in printed}
        for entry, path in zip(entries, paths, strict=True):
            assert entry.verity == expected[path], entry.name
            checked += 1
    assert checked > 10


def test_convert_is_reproducible(
    feature: BuiltImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    first = run_lazyfs("convert", "-q", feature.reference, f"oci:{tmp_path / 'a'}:v1").stdout
    second = run_lazyfs("convert", "-q", feature.reference, f"{registry.host}/again:x").stdout
    third = run_lazyfs(
        "convert", "-q", f"oci:{tmp_path / 'a'}:v1", f"oci:{tmp_path / 'b'}:v1"
    ).stdout
    assert first == second == third
    assert first.strip().startswith("sha256:")


def test_json_summary(feature: BuiltImage, tmp_path: Path) -> None:
    result = run_lazyfs("convert", "--json", feature.reference, f"oci:{tmp_path / 'out'}:v1")
    summary = json.loads(result.stdout)
    assert summary["digest"].startswith("sha256:")
    layers = summary["manifests"][0]["layers"]
    assert len(layers) == len(feature.layers)
    assert all(layer["files"] >= 0 and layer["chunks"] >= layer["files"] - 50 for layer in layers)
    assert {"sourceDigest", "size", "tarSize", "dedupRatio"} <= set(layers[0])
    # Without a profile the tars are the source's, and no layer says it was reordered.
    assert [layer["diffID"] for layer in layers] == [str(b.diff_id) for b in feature.layers]
    assert not any("profileFirst" in layer for layer in layers)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_uncompressed_and_zstd_inputs(compression: str, tmp_path: Path) -> None:
    layers = [[directory("d"), regular_file("d/f", b"x" * 100_000), regular_file("d/e", b"")]]
    built = write_image(tmp_path / "src", "v1", layers, compression)  # type: ignore[arg-type]
    run_lazyfs("convert", "-q", built.reference, f"oci:{tmp_path / 'out'}:v1")
    assert _manifest(OciLayout(tmp_path / "out")).layers[0].media_type == OCI_LAYER_TAR_ZSTD


def test_docker_v2s2_source_becomes_oci(
    feature: BuiltImage, registry: LocalRegistry, tmp_path: Path
) -> None:
    docker_ref = f"{registry.host}/dockerfmt:v1"
    skopeo_copy(feature.reference, f"docker://{docker_ref}", "--format", "v2s2")
    run_lazyfs("convert", "-q", docker_ref, f"oci:{tmp_path / 'out'}:v1")
    manifest = _manifest(OciLayout(tmp_path / "out"))
    assert manifest.media_type.startswith("application/vnd.oci.")
    assert all(layer.media_type == OCI_LAYER_TAR_ZSTD for layer in manifest.layers)


def _two_platform_index(path: Path) -> None:
    layers = [[regular_file("arch", b"amd64\n")]]
    amd = write_image(path, "amd", layers, platform=Platform("linux", "amd64"))
    arm = write_image(
        path, "arm", [[regular_file("arch", b"arm64\n")]], platform=Platform("linux", "arm64", "v8")
    )
    entries = tuple(
        Descriptor(
            b.manifest_descriptor.media_type,
            b.manifest_descriptor.digest,
            b.manifest_descriptor.size,
            platform=p,
        )
        for b, p in ((amd, Platform("linux", "amd64")), (arm, Platform("linux", "arm64", "v8")))
    )
    data = Index(OCI_INDEX, entries).to_bytes()
    layout = OciLayout(path)
    layout.tag(Descriptor(OCI_INDEX, layout.add_blob_bytes(data), len(data)), "multi")


def test_index_converts_every_platform_or_one(registry: LocalRegistry, tmp_path: Path) -> None:
    _two_platform_index(tmp_path / "src")
    source = f"oci:{tmp_path / 'src'}:multi"
    run_lazyfs("convert", "-q", source, f"{registry.host}/multi:all")
    out = tmp_path / "all"
    skopeo_copy(f"docker://{registry.host}/multi:all", f"oci:{out}:v1", "--all")
    index_descriptor = OciLayout(out).resolve("v1")
    index = Index.parse(
        OciLayout(out).read_blob(index_descriptor.digest), index_descriptor.media_type
    )
    assert sorted(str(d.platform) for d in index.manifests) == ["linux/amd64", "linux/arm64/v8"]
    run_lazyfs("convert", "-q", "--platform", "linux/arm64", source, f"oci:{tmp_path / 'one'}:v1")
    assert isinstance(_manifest(OciLayout(tmp_path / "one")), Manifest)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lazyfs: error: ")
    return lines[0]


def test_bad_reference_is_a_usage_error(tmp_path: Path) -> None:
    result = run_lazyfs("convert", "Not/A:Valid:Ref", f"oci:{tmp_path}:x", check=False)
    assert result.returncode == 2
    assert "invalid reference" in _error_line(result)


def test_unreachable_registry(tmp_path: Path) -> None:
    result = run_lazyfs(
        "convert", "127.0.0.1:9/nothing:here", f"oci:{tmp_path / 'o'}:x", check=False
    )
    assert result.returncode == 1
    assert "127.0.0.1:9" in _error_line(result)


def test_unsupported_layer_pushes_no_manifest(registry: LocalRegistry, tmp_path: Path) -> None:
    built = write_image(tmp_path / "src", "v1", [[regular_file("f", b"data")]])
    layout = OciLayout(tmp_path / "src")
    bad_layer = Descriptor(
        "application/vnd.example.unknown",
        built.layers[0].descriptor.digest,
        built.layers[0].descriptor.size,
    )
    manifest = built.manifest.with_layers([bad_layer])
    data = manifest.to_bytes()
    layout.tag(Descriptor(manifest.media_type, layout.add_blob_bytes(data), len(data)), "bad")
    target = f"{registry.host}/unsupported:v1"
    result = run_lazyfs("convert", f"oci:{tmp_path / 'src'}:bad", target, check=False)
    assert result.returncode == 1
    assert "application/vnd.example.unknown" in _error_line(result)
    inspect = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{target}"],
        capture_output=True,
        check=False,
    )
    assert inspect.returncode != 0  # no manifest was pushed


def test_corrupt_source_layer_is_rejected(tmp_path: Path) -> None:
    built = write_image(tmp_path / "src", "v1", [[regular_file("f", b"data" * 1000)]])
    blob = built.layout.blob_path(built.layers[0].descriptor.digest)
    blob.chmod(0o644)
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    blob.write_bytes(bytes(raw))
    result = run_lazyfs("convert", built.reference, f"oci:{tmp_path / 'out'}:v1", check=False)
    assert result.returncode == 1
    _error_line(result)
    out = tmp_path / "out"
    assert not (out / "index.json").exists() or OciLayout(out).tags() == []
