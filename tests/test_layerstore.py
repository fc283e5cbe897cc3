"""The additional layer store (``lazyfs serve --store``) through the file system, as
containers/storage uses it: layer directories by base64 reference and digest, ``info``,
``blob``, use marks, and the ``diff`` trees stacked by a real overlayfs, whose merged view
must equal the one ``lazyfs mount`` serves. podman itself: tests/test_podman.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from test_service import Served, start_service, stop

from lazyfs.convert.imagebuild import (
    directory,
    opaque_whiteout,
    regular_file,
    symlink,
    whiteout,
    with_parent_dirs,
    write_image,
)
from lazyfs.mount.images import SLOT_SHIFT
from lazyfs.registry.localserver import LocalRegistry

_INODE_BITS = (1 << SLOT_SHIFT) - 1  # a tree's own inode number, below the slot

LOWER = with_parent_dirs(
    [
        regular_file("etc/keep.conf", b"kept\n"),
        regular_file("etc/gone.conf", b"removed by the upper layer\n"),
        regular_file("opt/old/a.txt", b"hidden by an opaque directory\n"),
        regular_file("usr/lib/big.bin", random_bytes(3 << 20, seed=7)),
        symlink("usr/lib/link", "big.bin"),
    ]
)
UPPER = [
    whiteout("etc/gone.conf"),
    directory("opt/old"),
    opaque_whiteout("opt/old"),
    regular_file("opt/old/b.txt", b"new in the opaque directory\n"),
    regular_file("etc/new.conf", b"added\n", mode=0o600),
]


@pytest.fixture(scope="module")
def store_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, str]]:
    work = tmp_path_factory.mktemp("layerstore")
    with LocalRegistry(work / "registry") as registry:
        image = write_image(work / "img", "v1", [LOWER, UPPER])
        ref = f"{registry.host}/store/img:v1"
        run_lazyfs("convert", "-q", image.reference, ref)
        yield registry, ref


@pytest.fixture
def served_store(tmp_path: Path) -> Iterator[tuple[Served, Path]]:
    store = tmp_path / "store"
    served = start_service(tmp_path / "svc", "--store", str(store))
    try:
        yield served, store
    finally:
        stop(served)
        for path in (tmp_path / "merged", store):
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def manifest_of(registry: LocalRegistry, ref: str) -> dict[str, object]:
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def config_of(ref: str) -> dict[str, object]:
    out = subprocess.run(
        ["skopeo", "inspect", "--config", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def layer_dirs(store: Path, ref: str, manifest: dict[str, object]) -> list[Path]:
    ref_dir = store / base64.b64encode(ref.encode()).decode()
    return [ref_dir / layer["digest"] for layer in manifest["layers"]]  # type: ignore[attr-defined]


def test_layers_info_and_blob_are_what_containers_storage_checks(
    store_image: tuple[LocalRegistry, str], served_store: tuple[Served, Path]
) -> None:
    registry, ref = store_image
    _served, store = served_store
    manifest, config = manifest_of(registry, ref), config_of(ref)
    dirs = layer_dirs(store, ref, manifest)
    before = registry.access_log_summary().written("GET", "/v2/")
    for index, layer_dir in enumerate(dirs):
        for name in ("diff", "info", "blob"):  # containers/storage stats all three
            os.stat(layer_dir / name)
        info = json.loads((layer_dir / "info").read_bytes())
        layer = manifest["layers"][index]  # type: ignore[index]
        assert info["compressed-diff-digest"] == layer["digest"]
        assert info["compressed-size"] == layer["size"]
        assert info["diff-digest"] == config["rootfs"]["diff_ids"][index]  # type: ignore[index]
        assert info["compression"] == 4  # zstd, in containers/storage's numbering
        assert (layer_dir / "blob").stat().st_size == layer["size"]
    metadata_only = registry.access_log_summary().written("GET", "/v2/") - before
    total = sum(layer["size"] for layer in manifest["layers"])  # type: ignore[attr-defined]
    assert metadata_only < total / 4, "looking layers up must not fetch them"
    blob = (dirs[0] / "blob").read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == manifest["layers"][0]["digest"]  # type: ignore[index]


def test_diff_trees_are_overlayfs_layers_equal_to_the_merged_mount(
    store_image: tuple[LocalRegistry, str], served_store: tuple[Served, Path], tmp_path: Path
) -> None:
    registry, ref = store_image
    served, store = served_store
    lower, upper = layer_dirs(store, ref, manifest_of(registry, ref))
    gone = os.lstat(upper / "diff/etc/gone.conf")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0  # an overlayfs whiteout
    assert os.getxattr(upper / "diff/opt/old", "trusted.overlay.opaque") == b"y"
    assert not (upper / "diff/usr").exists()  # each layer is its own tree

    merged, work_upper, work = tmp_path / "merged", tmp_path / "up", tmp_path / "work"
    for path in (merged, work_upper, work):
        path.mkdir()
    # Digests hold ':', overlayfs' separator: links, as containers/storage's l/ directory has.
    (tmp_path / "l0").symlink_to(lower / "diff")
    (tmp_path / "l1").symlink_to(upper / "diff")
    options = f"lowerdir={tmp_path}/l1:{tmp_path}/l0,upperdir={work_upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    mounted = tmp_path / "mounted"
    served.mount(ref, mounted)
    try:
        assert _tree(merged) == _tree(mounted)
        assert not (merged / "etc/gone.conf").exists()
        assert sorted(os.listdir(merged / "opt/old")) == ["b.txt"]
        assert (merged / "usr/lib/big.bin").read_bytes() == random_bytes(3 << 20, seed=7)
        (merged / "etc/keep.conf").write_bytes(b"changed in the container\n")
        assert (work_upper / "etc/keep.conf").read_bytes() == b"changed in the container\n"
        assert (lower / "diff/etc/keep.conf").read_bytes() == b"kept\n"  # the image is untouched
    finally:
        subprocess.run(["umount", str(merged)], check=False)
        served.call("umount", str(mounted))


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).digest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path).encode()
            else:
                content = b""
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size, content)
    return found


def test_use_marks_and_release_are_counted_and_release_the_image(
    store_image: tuple[LocalRegistry, str], served_store: tuple[Served, Path]
) -> None:
    registry, ref = store_image
    served, store = served_store
    dirs = layer_dirs(store, ref, manifest_of(registry, ref))
    for layer_dir in dirs:  # what containers/storage does: create "use" (ENOENT: not made)
        with pytest.raises(FileNotFoundError):
            open(layer_dir / "use", "w")  # noqa: SIM115
    assert json.loads(served.call("stats", "--json").stdout)["store_images"] == 1
    for layer_dir in dirs:  # ... and release with rmdir, answered ENOENT
        with pytest.raises(FileNotFoundError):
            os.rmdir(layer_dir)
    assert json.loads(served.call("stats", "--json").stdout)["store_images"] == 0
    with pytest.raises(OSError):
        (dirs[0] / "diff" / "x").write_bytes(b"")  # the trees stay read-only
    assert (dirs[1] / "diff/etc/new.conf").read_bytes() == b"added\n"  # reopened on lookup


def test_unknown_references_and_layers_are_not_found(
    store_image: tuple[LocalRegistry, str], served_store: tuple[Served, Path]
) -> None:
    registry, ref = store_image
    _served, store = served_store
    ref_dir = store / base64.b64encode(ref.encode()).decode()
    assert not (ref_dir / ("sha256:" + "0" * 64) / "diff").exists()
    assert not (store / "not-base64!" / "x").exists()
    missing = base64.b64encode(f"{registry.host}/store/none:v1".encode()).decode()
    assert not (store / missing / ("sha256:" + "0" * 64) / "diff").exists()


@pytest.mark.parametrize("kind", ["estargz", "plain"])
def test_estargz_and_plain_layers_are_served_too(
    kind: str, served_store: tuple[Served, Path], tmp_path: Path
) -> None:
    from estargz_build import write_estargz_image
    from oracles import skopeo_copy

    _served, store = served_store
    with LocalRegistry(tmp_path / "registry") as registry:
        ref = f"{registry.host}/store/{kind}:v1"
        if kind == "estargz":
            built = write_estargz_image(tmp_path / "src", "v1", [LOWER, UPPER], chunk_size=64 << 10)
            skopeo_copy(f"oci:{built.image.layout.path}:v1", f"docker://{ref}")
        else:
            image = write_image(tmp_path / "src", "v1", [LOWER, UPPER])
            skopeo_copy(f"oci:{image.layout.path}:v1", f"docker://{ref}")
        manifest = manifest_of(registry, ref)
        lower, upper = layer_dirs(store, ref, manifest)
        info = json.loads((upper / "info").read_bytes())
        assert info["compressed-diff-digest"] == manifest["layers"][1]["digest"]  # type: ignore[index]
        expected_compression = {"estargz": 2}.get(kind)
        if expected_compression is not None:
            assert info["compression"] == expected_compression
        assert stat.S_ISCHR(os.lstat(upper / "diff/etc/gone.conf").st_mode)
        assert os.getxattr(upper / "diff/opt/old", "trusted.overlay.opaque") == b"y"
        assert (lower / "diff/usr/lib/big.bin").read_bytes() == random_bytes(3 << 20, seed=7)


def test_files_of_two_layers_with_one_inode_number_read_right(
    served_store: tuple[Served, Path], tmp_path: Path
) -> None:
    """Each layer's tree numbers its inodes from 1 and one resolver serves them all: a small
    file of the lower layer read first must not cut the upper layer's big file of the same
    number by its own chunk offsets (it read as the first chunk, then zeros)."""
    _served, store = served_store
    big = random_bytes(3 << 20, seed=11)
    lower = with_parent_dirs([regular_file("a/small", b"small\n")])
    upper = with_parent_dirs([regular_file("b/big", big)])
    with LocalRegistry(tmp_path / "registry") as registry:
        image = write_image(tmp_path / "src", "v1", [lower, upper])
        ref = f"{registry.host}/store/collide:v1"
        run_lazyfs("convert", "-q", image.reference, ref)
        lower_dir, upper_dir = layer_dirs(store, ref, manifest_of(registry, ref))
        small, large = lower_dir / "diff/a/small", upper_dir / "diff/b/big"
        assert os.stat(small).st_ino & _INODE_BITS == os.stat(large).st_ino & _INODE_BITS  # 3
        assert small.read_bytes() == b"small\n"
        assert large.read_bytes() == big
