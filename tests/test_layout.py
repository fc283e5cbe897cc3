"""lazyfs.convert.layout against layouts written by skopeo and umoci, and read back by skopeo."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
from imagebuild import build_feature_image
from oracles import require_tool, run_tool, skopeo_copy, skopeo_inspect

from lazyfs.convert.imagebuild import regular_file, write_image
from lazyfs.convert.layout import MAX_INDEX_BYTES, OciLayout
from lazyfs.errors import IntegrityError, LayoutError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    DOCKER_MANIFEST_V2,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
)


def _manifest_descriptor(layout: OciLayout, name: str) -> Descriptor:
    return Descriptor.of_bytes(OCI_MANIFEST, layout.read_blob(layout.add_blob_bytes(name.encode())))


# --- creating and opening ----------------------------------------------------------------------


def test_create_writes_the_layout_files(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "new" / "layout")
    assert json.loads((layout.path / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert Index.parse((layout.path / "index.json").read_bytes(), None) == Index(OCI_INDEX, ())
    assert (layout.path / "blobs" / "sha256").is_dir()
    assert layout.tags() == []


def test_create_is_idempotent(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    layout.tag(_manifest_descriptor(layout, "m"), "v1")
    assert OciLayout.create(tmp_path).tags() == ["v1"]


def test_open_missing_layout(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no oci-layout"):
        OciLayout(tmp_path / "absent")


@pytest.mark.parametrize(
    "content", [b"", b"[]", b"{}", b'{"imageLayoutVersion": 1}', b'{"imageLayoutVersion": "2.0.0"}']
)
def test_open_malformed_oci_layout_file(tmp_path: Path, content: bytes) -> None:
    OciLayout.create(tmp_path)
    (tmp_path / "oci-layout").write_bytes(content)
    with pytest.raises(LayoutError):
        OciLayout(tmp_path)


def test_open_without_blobs_dir(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    with pytest.raises(LayoutError, match="blobs"):
        OciLayout(tmp_path)


@pytest.mark.parametrize(
    "content", [None, b"{", b'{"schemaVersion":2}', b'{"schemaVersion":2,"manifests":{}}']
)
def test_malformed_index_json(tmp_path: Path, content: bytes | None) -> None:
    layout = OciLayout.create(tmp_path)
    if content is None:
        (tmp_path / "index.json").unlink()
    else:
        (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(LayoutError, match=r"index\.json"):
        layout.resolve(None)


def test_an_oversized_index_json_is_refused_unread(tmp_path: Path) -> None:
    """The author of a layout controls index.json: one over the cap is one LayoutError, and
    is not read (the check is the file's size)."""
    layout = OciLayout.create(tmp_path)
    padded = b'{"schemaVersion":2,"manifests":[]' + b" " * MAX_INDEX_BYTES + b"}"
    (tmp_path / "index.json").write_bytes(padded)
    with pytest.raises(LayoutError, match=r"index\.json is \d+ bytes, more than the \d+ allowed"):
        layout.tags()
    (tmp_path / "index.json").write_bytes(padded[: MAX_INDEX_BYTES - 1] + b"}")
    assert layout.tags() == []  # at the cap: read as before


def test_an_oversized_oci_layout_file_is_refused(tmp_path: Path) -> None:
    OciLayout.create(tmp_path)
    padded = b'{"imageLayoutVersion":"1.0.0"' + b" " * (1 << 20) + b"}"
    (tmp_path / "oci-layout").write_bytes(padded)
    with pytest.raises(LayoutError, match=r"oci-layout is \d+ bytes, more than"):
        OciLayout(tmp_path)


# --- blobs -------------------------------------------------------------------------------------


def test_blob_bytes_round_trip(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    digest = layout.add_blob_bytes(b"hello")
    assert digest == Digest.of(b"hello")
    assert layout.blob_path(digest) == tmp_path / "blobs" / "sha256" / digest.hex
    assert layout.has_blob(digest)
    assert layout.read_blob(digest) == b"hello"
    assert layout.add_blob_bytes(b"hello") == digest
    assert oct(layout.blob_path(digest).stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in (tmp_path / "blobs" / "sha256").iterdir()] == [digest.hex]


def test_read_missing_blob(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    assert not layout.has_blob(Digest.of(b"x"))
    with pytest.raises(LayoutError, match="no blob"):
        layout.read_blob(Digest.of(b"x"))


def test_read_blob_with_a_cap(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    digest = layout.add_blob_bytes(b"x" * 100)
    assert layout.read_blob(digest, 100) == b"x" * 100
    with pytest.raises(LayoutError, match="is 100 bytes, more than the 99 allowed"):
        layout.read_blob(digest, 99)


def test_read_corrupt_blob(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    digest = layout.add_blob_bytes(b"good")
    layout.blob_path(digest).write_bytes(b"evil")
    with pytest.raises(IntegrityError):
        layout.read_blob(digest)


def test_add_blob_file_moves_it(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    src = tmp_path / "blob.tmp"
    src.write_bytes(b"x" * 5000)
    os.chmod(src, 0o600)
    digest = Digest.of(b"x" * 5000)
    layout.add_blob_file(src, digest)
    assert not src.exists()
    assert layout.read_blob(digest) == b"x" * 5000
    assert layout.blob_path(digest).stat().st_mode & 0o777 == 0o644


def test_add_blob_file_checks_the_digest(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    src = tmp_path / "blob.tmp"
    src.write_bytes(b"actual")
    with pytest.raises(IntegrityError):
        layout.add_blob_file(src, Digest.of(b"claimed"))
    assert src.exists()
    assert not layout.has_blob(Digest.of(b"claimed"))


def test_add_missing_blob_file(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    with pytest.raises(LayoutError):
        layout.add_blob_file(tmp_path / "absent", Digest.of(b""))


def test_add_blob_file_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    src = tmp_path / "blob.tmp"
    src.write_bytes(b"far away")
    real_replace = os.replace

    def replace_like_another_fs(a: os.PathLike[str] | str, b: os.PathLike[str] | str) -> None:
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace_like_another_fs)
    layout.add_blob_file(src, Digest.of(b"far away"))
    assert not src.exists()
    assert layout.read_blob(Digest.of(b"far away")) == b"far away"
    assert [p.name for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir()] == [
        Digest.of(b"far away").hex
    ]


def test_add_blob_file_from_tmpfs(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    layout = OciLayout.create(tmp_path / "layout")
    src = shm / f"lazyfs-test-{os.getpid()}"
    src.write_bytes(b"from tmpfs")
    try:
        layout.add_blob_file(src, Digest.of(b"from tmpfs"))
    finally:
        src.unlink(missing_ok=True)
    assert layout.read_blob(Digest.of(b"from tmpfs")) == b"from tmpfs"


# --- tags --------------------------------------------------------------------------------------


def test_tag_and_resolve(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    first, second = _manifest_descriptor(layout, "1"), _manifest_descriptor(layout, "2")
    layout.tag(first, "v1")
    assert layout.resolve(None).digest == first.digest
    assert layout.resolve("v1").ref_name == "v1"
    layout.tag(second, "v2")
    layout.tag(second, "v1")  # moves v1, keeps v2
    assert layout.tags() == ["v2", "v1"]
    assert layout.resolve("v1").digest == second.digest
    assert layout.resolve("v1").annotations == {REF_NAME_ANNOTATION: "v1"}


def test_tag_keeps_other_annotations_and_index_fields(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    (tmp_path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [], "annotations": {"keep": "me"}, "x": 1})
    )
    descriptor = _manifest_descriptor(layout, "m").with_annotations({"other": "a"})
    layout.tag(descriptor, "t")
    index = layout.index()
    assert index.annotations == {"keep": "me"}
    assert index.extra == {"x": 1}
    assert layout.resolve("t").annotations == {"other": "a", REF_NAME_ANNOTATION: "t"}


def test_resolve_errors_list_the_tags(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    with pytest.raises(LayoutError, match=r"holds 0 images.*tags: none"):
        layout.resolve(None)
    layout.tag(_manifest_descriptor(layout, "a"), "alpha")
    layout.tag(_manifest_descriptor(layout, "b"), "beta")
    with pytest.raises(LayoutError, match=r"no image tagged 'gamma' \(tags: alpha, beta\)"):
        layout.resolve("gamma")
    with pytest.raises(LayoutError, match=r"holds 2 images.*alpha, beta"):
        layout.resolve(None)


def test_empty_tag_is_refused(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    with pytest.raises(UsageError):
        layout.tag(_manifest_descriptor(layout, "a"), "")


def test_concurrent_tagging_loses_nothing(tmp_path: Path) -> None:
    layout = OciLayout.create(tmp_path)
    descriptor = _manifest_descriptor(layout, "m")

    def tag_many(worker: int) -> None:
        for i in range(10):
            OciLayout(tmp_path).tag(descriptor, f"w{worker}-{i}")

    threads = [threading.Thread(target=tag_many, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(layout.tags()) == sorted(f"w{w}-{i}" for w in range(6) for i in range(10))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- other tools -------------------------------------------------------------------------------


def _check_image(layout: OciLayout, tag: str, manifest_type: str) -> Manifest:
    descriptor = layout.resolve(tag)
    assert descriptor.media_type == manifest_type
    manifest = Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)
    config = ImageConfig.parse(layout.read_blob(manifest.config.digest))
    assert len(config.diff_ids) == len(manifest.layers)
    for layer in manifest.layers:
        assert len(layout.read_blob(layer.digest)) == layer.size
    return manifest


def test_read_layout_written_by_skopeo(tmp_path: Path) -> None:
    built = build_feature_image(tmp_path / "ours", "feat")
    skopeo_copy(built.reference, f"oci:{tmp_path / 'skopeo'}:copied")
    skopeo_copy(built.reference, f"oci:{tmp_path / 'skopeo'}:docker", "--format=v2s2")
    layout = OciLayout(tmp_path / "skopeo")
    assert sorted(layout.tags()) == ["copied", "docker"]
    oci = _check_image(layout, "copied", OCI_MANIFEST)
    assert oci.layers == built.manifest.layers
    docker = _check_image(layout, "docker", DOCKER_MANIFEST_V2)
    assert [layer.digest for layer in docker.layers] == [layer.digest for layer in oci.layers]
    # skopeo writes OCI manifests in the same canonical form as lazyfs.
    raw = layout.read_blob(layout.resolve("copied").digest)
    assert oci.to_bytes() == raw


def test_read_layout_written_by_umoci(tmp_path: Path) -> None:
    umoci = require_tool("umoci")
    path = tmp_path / "umoci"
    run_tool([umoci, "init", "--layout", path])
    run_tool([umoci, "new", "--image", f"{path}:empty"])
    layout = OciLayout(path)
    assert layout.tags() == ["empty"]
    manifest = _check_image(layout, "empty", OCI_MANIFEST)
    assert manifest.layers == ()
    layout.tag(layout.resolve("empty"), "again")  # umoci must still read what we rewrote
    assert sorted(run_tool([umoci, "ls", "--layout", path]).split()) == ["again", "empty"]


def test_skopeo_reads_what_we_write(tmp_path: Path) -> None:
    built = write_image(tmp_path / "ours", "v1", [[regular_file("hello", b"hi\n")]], "zstd")
    built.layout.tag(built.manifest_descriptor, "v2")
    inspected = json.loads(skopeo_inspect(f"oci:{tmp_path / 'ours'}:v2"))
    assert inspected["Digest"] == str(built.manifest_descriptor.digest)
    assert inspected["Layers"] == [str(layer.descriptor.digest) for layer in built.layers]
    raw = skopeo_inspect(f"oci:{tmp_path / 'ours'}:v1", "--raw")
    assert raw.encode() == built.manifest.to_bytes()
    config = json.loads(skopeo_inspect(f"oci:{tmp_path / 'ours'}:v1", "--config", "--raw"))
    assert config["rootfs"]["diff_ids"] == [str(layer.diff_id) for layer in built.layers]
