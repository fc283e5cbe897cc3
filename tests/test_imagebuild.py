"""The image builder (lazyfs.convert.imagebuild), the test images and the tree oracles, checked
against each other and against umoci."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from imagebuild import (
    CAP_NET_RAW_XATTR,
    LONG_DIR,
    MIB,
    big_image_layers,
    build_big_image,
    build_feature_image,
    build_umoci_image,
    feature_layers,
)
from oracles import (
    EntryInfo,
    assert_trees_equal,
    require_tool,
    tree_differences,
    tree_snapshot,
    umoci_unpack,
)

from lazyfs.convert.imagebuild import (
    BuiltImage,
    ContainerConfig,
    file_read_when_written,
    layer_tar_bytes,
    regular_file,
    with_parent_dirs,
    write_image,
    write_tar_file,
    write_tar_image,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import ImageConfig, Manifest, layer_compression


def _layer_tar(layout: OciLayout, manifest: Manifest, index: int) -> bytes:
    layer = manifest.layers[index]
    blob = layout.read_blob(layer.digest)
    method = layer_compression(layer.media_type)
    if method == "gzip":
        return gzip.decompress(blob)
    if method == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


@pytest.fixture(scope="module")
def feature_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return build_feature_image(tmp_path_factory.mktemp("feature") / "layout", "feat")


@pytest.fixture(scope="module")
def feature_tree(
    feature_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, EntryInfo]:
    bundle = tmp_path_factory.mktemp("unpacked") / "bundle"
    return tree_snapshot(umoci_unpack(feature_image.layout.path, feature_image.tag, bundle))


# --- the builder on its own --------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layers_match_their_diff_ids(tmp_path: Path, compression: str) -> None:
    built = build_feature_image(tmp_path, "feat", compression)  # type: ignore[arg-type]
    descriptor = built.layout.resolve("feat")
    manifest = Manifest.parse(built.layout.read_blob(descriptor.digest), descriptor.media_type)
    config = ImageConfig.parse(built.layout.read_blob(manifest.config.digest))
    assert len(manifest.layers) == 3
    for index, diff_id in enumerate(config.diff_ids):
        assert layer_compression(manifest.layers[index].media_type) == compression
        tar = _layer_tar(built.layout, manifest, index)
        assert Digest.of(tar) == diff_id == built.layers[index].diff_id
        assert len(tar) == built.layers[index].tar_size


def test_builds_are_reproducible(tmp_path: Path) -> None:
    first = build_feature_image(tmp_path / "a", "x", "zstd")
    second = build_feature_image(tmp_path / "b", "y", "zstd")
    assert first.manifest_descriptor.digest == second.manifest_descriptor.digest


def test_tar_members_are_pax_sorted_and_fixed(feature_image: BuiltImage) -> None:
    tar_bytes = _layer_tar(feature_image.layout, feature_image.manifest, 0)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    links = [m for m in members if m.islnk()]
    assert names[: len(names) - len(links)] == sorted(names[: len(names) - len(links)])
    assert all(names.index(m.linkname) < names.index(m.name) for m in links)
    assert {m.mtime for m in members} == {1_700_000_000}
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    ping = next(m for m in members if m.name == "usr/bin/ping")
    assert ping.pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape"
    ) == (CAP_NET_RAW_XATTR)
    assert f"{LONG_DIR}/file" in names


def test_binary_xattrs_survive_the_tar(tmp_path: Path) -> None:
    value = bytes(range(256))
    data = layer_tar_bytes([regular_file("f", xattrs={"user.bin": value})])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember("f")
    assert member.pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == value


def test_big_image_layers_share_content() -> None:
    layers = big_image_layers(12 * MIB, seed=3)
    files = [e for layer in layers for e in layer if e.type == "file"]
    total = sum(len(e.data) for e in files)
    assert 12 * MIB <= total < 12 * MIB + 6 * MIB
    assert len(layers) == 3 and all(layers)
    lower_hashes = {
        hashlib.sha256(e.data).digest() for e in layers[0] if e.type == "file" and e.data
    }
    upper = [e for layer in layers[1:] for e in layer if e.type == "file"]
    assert any(hashlib.sha256(e.data).digest() in lower_hashes for e in upper)
    assert big_image_layers(12 * MIB, seed=3) == layers


def test_big_image_unpacks(tmp_path: Path) -> None:
    built = build_big_image(tmp_path / "layout", "big", 8 * MIB, "zstd")
    tree = tree_snapshot(umoci_unpack(built.layout.path, "big", tmp_path / "bundle"))
    expected: dict[str, str] = {}
    for layer in built.layers:
        expected.update(
            {e.path: hashlib.sha256(e.data).hexdigest() for e in layer.entries if e.type == "file"}
        )
    actual = {path: info.sha256 for path, info in tree.items() if info.kind == "file"}
    assert actual == expected


def test_files_read_when_written_make_the_same_tar() -> None:
    reads: list[str] = []

    def read() -> bytes:
        reads.append("f")
        return b"late bytes"

    late = [file_read_when_written("d/f", read, 0o755)]
    assert reads == []  # nothing is read until the tar is written
    eager = [regular_file("d/f", b"late bytes", 0o755)]
    assert layer_tar_bytes(with_parent_dirs(late)) == layer_tar_bytes(with_parent_dirs(eager))
    assert reads == ["f"]


def test_tar_file_layers_match_entry_layers(tmp_path: Path) -> None:
    entries = feature_layers()[0]
    tar_path = tmp_path / "layer.tar"
    assert write_tar_file(entries, tar_path) == len(layer_tar_bytes(entries))
    from_tar = write_tar_image(tmp_path / "from-tar", "v1", [tar_path], "zstd")
    from_entries = write_image(tmp_path / "from-entries", "v1", [entries], "zstd")
    assert from_tar.manifest_descriptor == from_entries.manifest_descriptor
    assert from_tar.layers[0].diff_id == Digest.of(tar_path.read_bytes())
    assert tar_path.exists()  # the tar stays where it was


def test_container_config_is_written(tmp_path: Path) -> None:
    container = ContainerConfig(command=("/app/run",), env=("PATH=/app",), working_dir="/app")
    built = write_image(tmp_path, "v1", [[regular_file("app/run")]], container=container)
    config = ImageConfig.parse(built.layout.read_blob(built.manifest.config.digest))
    expected = {"Env": ["PATH=/app"], "Cmd": ["/app/run"], "WorkingDir": "/app"}
    assert config.fields["config"] == expected
    assert config.diff_ids == built.config.diff_ids == (built.layers[0].diff_id,)


# --- the builder against umoci -----------------------------------------------------------------


def test_whiteouts_and_opaque_dirs_applied(feature_tree: dict[str, EntryInfo]) -> None:
    for gone in [
        "remove-me.txt",
        "gone/file",
        "gone/sub",
        "opaque/old-a",
        "opaque/old-sub",
        "data/added-in-2.txt",
    ]:
        assert gone not in feature_tree
    assert not [path for path in feature_tree if "/.wh." in f"/{path}"]
    assert {"gone/reborn", "opaque/new-b", "opaque/new-c"} <= feature_tree.keys()
    # An opaque marker hides the directory's lower contents, not the directory's own metadata.
    assert feature_tree["opaque"].xattrs == (("user.dirattr", b"kept"),)


def test_replacements_across_layers(feature_tree: dict[str, EntryInfo]) -> None:
    assert feature_tree["becomes-dir"].kind == "dir"
    assert feature_tree["becomes-dir/inner"].kind == "file"
    assert feature_tree["becomes-file"].kind == "file"
    assert feature_tree["etc/hostname"].sha256 == hashlib.sha256(b"layer2\n").hexdigest()
    small = feature_tree["data/small.txt"]
    assert (small.mode, small.uid, small.gid) == (0o600, 1, 1)
    home = feature_tree["home/user"]
    assert (home.mode, home.uid, home.gid) == (0o750, 1000, 1000)
    # Layer 2 replaced notes.txt, so only its xattrs remain.
    assert feature_tree["home/user/notes.txt"].xattrs == (("user.comment", b"changed"),)


def test_hardlinks_grouped(feature_tree: dict[str, EntryInfo]) -> None:
    groups: dict[str, list[str]] = {}
    for path, info in feature_tree.items():
        if info.hardlink_group is not None:
            groups.setdefault(info.hardlink_group, []).append(path)
    assert groups == {
        "data/hl/one": ["data/hl/one", "data/hl/three", "data/hl/two"],
        "data/l3-file": ["data/l3-file", "data/l3-link"],
        "usr/bin/tool": ["usr/bin/tool", "usr/bin/tool-alias"],
    }


def test_special_files_modes_and_xattrs(feature_tree: dict[str, EntryInfo]) -> None:
    assert feature_tree["dev/null"].kind == "char" and feature_tree["dev/null"].device == (1, 3)
    assert feature_tree["dev/loop0"].kind == "block" and feature_tree["dev/loop0"].device == (7, 0)
    assert feature_tree["dev/initctl"].kind == "fifo"
    assert feature_tree["usr/bin/su"].mode == 0o4755
    assert (feature_tree["usr/bin/wall"].mode, feature_tree["usr/bin/wall"].gid) == (0o2755, 5)
    assert feature_tree["tmp"].mode == 0o1777
    assert feature_tree["usr/bin/ping"].xattrs == (("security.capability", CAP_NET_RAW_XATTR),)
    assert feature_tree["etc/localtime"].target == "/usr/share/zoneinfo/UTC"
    assert feature_tree["usr/bin/sh"].target == "tool"
    assert feature_tree["data/empty"].size == 0
    assert feature_tree["data/zeros.bin"].size == MIB + 3
    assert feature_tree["data/ünïcödé-名前.txt"].kind == "file"
    assert feature_tree[f"{LONG_DIR}/file"].kind == "file"


def test_compressions_unpack_to_the_same_tree(
    tmp_path: Path, feature_tree: dict[str, EntryInfo]
) -> None:
    for compression in ("none", "zstd"):
        built = build_feature_image(tmp_path / compression, "feat", compression)
        bundle = tmp_path / f"bundle-{compression}"
        assert_trees_equal(
            tree_snapshot(umoci_unpack(built.layout.path, "feat", bundle)), feature_tree
        )


def test_builder_agrees_with_umoci(tmp_path: Path) -> None:
    """The same entries, once through our tar writer and once through umoci repack."""
    entries = feature_layers()[0]
    ours = write_image(tmp_path / "ours", "base", [entries])
    build_umoci_image(tmp_path / "umoci", "base", entries, tmp_path)
    ours_tree = tree_snapshot(umoci_unpack(ours.layout.path, "base", tmp_path / "ours-bundle"))
    umoci_tree = tree_snapshot(umoci_unpack(tmp_path / "umoci", "base", tmp_path / "umoci-bundle"))
    assert_trees_equal(ours_tree, umoci_tree)
    assert len(ours_tree) == len(entries) + 1  # and the root


# --- the oracles -------------------------------------------------------------------------------


def test_tree_snapshot_and_differences(tmp_path: Path) -> None:
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_bytes(b"same")
        os.link(root / "d" / "f", root / "g")
        os.symlink("/nonexistent", root / "link")
        os.setxattr(root / "d", "user.k", b"v")
    a, b = tree_snapshot(tmp_path / "a"), tree_snapshot(tmp_path / "b")
    assert_trees_equal(a, b)
    assert a["g"].hardlink_group == "d/f" and a["link"].target == "/nonexistent"
    (tmp_path / "b" / "g").unlink()
    (tmp_path / "b" / "g").write_bytes(b"same")
    os.chmod(tmp_path / "b" / "d", 0o700)
    (tmp_path / "b" / "extra").touch()
    os.chmod(tmp_path / "b" / "extra", 0o644)
    differences = tree_differences(a, tree_snapshot(tmp_path / "b"))
    assert differences == [
        "differs: d: mode: 0755 != 0700",
        "differs: d/f: hardlink_group: 'd/f' != None",
        "only in second: extra: file mode=0644 owner=0:0 size=0 "
        "sha256='e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
        "differs: g: hardlink_group: 'd/f' != None",
    ]
    with pytest.raises(AssertionError, match="4 differences"):
        assert_trees_equal(a, tree_snapshot(tmp_path / "b"))


def test_require_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("sh").endswith("/sh")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-lazyfs"):
        require_tool("no-such-tool-lazyfs")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-tool-lazyfs")
