"""``lazyfs mount oci:PATH[:TAG]``: an image in an OCI layout on disk, mounted through the
service (registry/layoutregistry.py): a converted layout read lazily by range, a plain (gzip)
layout converted on the node, and bad locations as one-line errors. umoci's unpack of the
same layout is the oracle for the tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from imagebuild import random_bytes
from lazyfs_run import run_lazyfs
from oracles import umoci_unpack
from test_service import Served, lazyfs_mounts, read_all, start_service, stop

from lazyfs.convert.imagebuild import regular_file, symlink, with_parent_dirs, write_image
from lazyfs.convert.layout import MAX_INDEX_BYTES, OciLayout
from lazyfs.errors import LayoutError
from lazyfs.model.manifests import OCI_MANIFEST, Descriptor
from lazyfs.model.ranges import ByteRange
from lazyfs.registry.layoutregistry import (
    LayoutRegistry,
    is_layout_host,
    layout_host,
    parse_range_header,
)
from lazyfs.service.layouts import ServedLayouts
from lazyfs.service.service import RECENT_IMAGES_MAX

FILES = {f"data/f{i}.bin": random_bytes(96 << 10, seed=300 + i) for i in range(12)}
FILES["etc/hello.txt"] = b"hello from a layout\n"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gzip layout with one image (tag v1), and its zstd:chunked conversion (tag chunked,
    beside a second image, so that the tag is needed)."""
    work = tmp_path_factory.mktemp("layouts")
    entries = with_parent_dirs(
        [*(regular_file(p, d) for p, d in FILES.items()), symlink("etc/link", "hello.txt")]
    )
    image = write_image(work / "plain", "v1", [entries])
    converted = work / "converted"
    run_lazyfs("convert", "-q", image.reference, f"oci:{converted}:chunked")
    run_lazyfs("convert", "-q", image.reference, f"oci:{converted}:other")
    return work / "plain", converted


def _mount(served: Served, location: str, mountpoint: Path) -> subprocess.CompletedProcess[str]:
    mountpoint.mkdir(exist_ok=True)
    return run_lazyfs("mount", "--socket", str(served.socket), location, str(mountpoint))


def test_a_converted_layout_mounts_lazily_and_equals_umoci(
    service: Served, layouts: tuple[Path, Path], tmp_path: Path
) -> None:
    _, converted = layouts
    mountpoint = tmp_path / "m"
    result = _mount(service, f"oci:{converted}:chunked", mountpoint)
    assert f"mounted oci:{converted}:chunked at" in result.stderr
    stats = run_lazyfs("stats", str(mountpoint), "--json").stdout
    assert '"bytes_fetched": 0' in stats  # nothing read yet: only the manifest and TOCs
    read_all(mountpoint, FILES, threads=4)
    assert os.readlink(mountpoint / "etc/link") == "hello.txt"
    rootfs = umoci_unpack(converted, "chunked", tmp_path / "bundle")
    for path, data in FILES.items():
        assert (rootfs / path).read_bytes() == data
    assert sorted(os.listdir(mountpoint / "data")) == sorted(os.listdir(rootfs / "data"))
    run_lazyfs("umount", "--socket", str(service.socket), str(mountpoint))


def test_a_plain_layout_with_one_image_needs_no_tag(
    service: Served, layouts: tuple[Path, Path], tmp_path: Path
) -> None:
    plain, _ = layouts
    mountpoint = tmp_path / "m"
    _mount(service, f"oci:{plain}", mountpoint)
    read_all(mountpoint, FILES, threads=2)
    run_lazyfs("umount", "--socket", str(service.socket), str(mountpoint))


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("oci:{converted}", "holds 2 images, name one (tags: chunked, other)"),
        ("oci:{converted}:nope", "no image tagged 'nope' (tags: chunked, other)"),
        ("oci:{missing}", "not an OCI image layout"),
        ("oci:", "oci: needs a path"),
    ],
)
def test_bad_layouts_are_one_line(
    service: Served, layouts: tuple[Path, Path], tmp_path: Path, location: str, message: str
) -> None:
    _, converted = layouts
    text = location.format(converted=converted, missing=tmp_path / "missing")
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    result = run_lazyfs(
        "mount", "--socket", str(service.socket), text, str(mountpoint), check=False
    )
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert mountpoint not in lazyfs_mounts()


def test_range_headers_as_a_registry_reads_them() -> None:
    assert parse_range_header("bytes=0-9", 100) == [ByteRange(0, 10)]
    assert parse_range_header("bytes=90-200", 100) == [ByteRange(90, 100)]
    assert parse_range_header("bytes=-10", 100) == [ByteRange(90, 100)]
    assert parse_range_header("bytes=95-", 100) == [ByteRange(95, 100)]
    assert parse_range_header("bytes=0-1, 4-5", 100) == [ByteRange(0, 2), ByteRange(4, 6)]
    assert parse_range_header("bytes=200-300", 100) == []  # 416
    assert parse_range_header("items=0-1", 100) is None  # not bytes: the whole blob
    assert parse_range_header("bytes=x-1", 100) is None
    assert parse_range_header(",".join(["bytes=0-0"] + ["1-1"] * 64), 100) == []


def test_layout_hosts_are_their_own() -> None:
    host = layout_host(Path("/a/b"))
    assert is_layout_host(host) and host.endswith(".invalid")
    assert layout_host(Path("/a/c")) != host


def test_the_service_caps_each_images_metadata(layouts: tuple[Path, Path], tmp_path: Path) -> None:
    """``lazyfs serve --max-image-toc-entries``: an image over it is refused in one line."""
    _, converted = layouts
    served = start_service(tmp_path / "svc", "--max-image-toc-entries", "5")
    try:
        mountpoint = tmp_path / "m"
        mountpoint.mkdir()
        result = run_lazyfs(
            "mount", "--socket", str(served.socket), f"oci:{converted}:chunked", str(mountpoint),
            check=False,
        )  # fmt: skip
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "max_image_toc_entries" in result.stderr
    finally:
        stop(served)


@pytest.mark.parametrize("value", ["0", "-3", "x", "1.5"])
def test_bad_caps_are_usage_errors(value: str) -> None:
    result = run_lazyfs("serve", "--max-image-toc-entries", value, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_an_oversized_manifest_in_a_layout_is_refused_unread(
    service: Served, tmp_path: Path
) -> None:
    """The author of a layout controls its files: a "manifest" of 5 MiB is refused, as a
    registry's answer over the cap would be, before it is read."""
    layout = OciLayout.create(tmp_path / "big")
    data = b"{" + b" " * (5 << 20) + b"}"
    digest = layout.add_blob_bytes(data)
    layout.tag(Descriptor(OCI_MANIFEST, digest, len(data)), "big")
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    result = run_lazyfs(
        "mount", "--socket", str(service.socket), f"oci:{tmp_path / 'big'}:big", str(mountpoint),
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "more than" in result.stderr


def test_an_oversized_index_json_is_refused_in_one_line(service: Served, tmp_path: Path) -> None:
    """index.json is capped as a registry's index is: ``mount oci:`` of a layout whose
    index.json is over the cap fails in one line, naming the file."""
    layout = OciLayout.create(tmp_path / "big")
    index = layout.path / "index.json"
    index.write_bytes(index.read_bytes()[:-1] + b" " * MAX_INDEX_BYTES + b"}")
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    result = run_lazyfs(
        "mount", "--socket", str(service.socket), f"oci:{layout.path}", str(mountpoint),
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert f"{index} is" in result.stderr and "more than" in result.stderr, result.stderr
    assert mountpoint not in lazyfs_mounts()


def test_served_layouts_keep_what_is_used_or_being_opened(tmp_path: Path) -> None:
    layouts = ServedLayouts()
    a, b = (LayoutRegistry(OciLayout.create(tmp_path / name)) for name in "ab")
    with layouts.opening("a.invalid", a):
        with layouts.opening("b.invalid", b):
            assert layouts.prune([]) == []  # both being opened
        assert layouts.prune([]) == [b]
        with pytest.raises(LayoutError), layouts.opening("b.invalid", b):
            raise LayoutError("the open failed")
    assert layouts.prune(["a.invalid"]) == [b]  # used: kept; the failed open's: dropped
    assert list(layouts.by_host) == ["a.invalid"]
    assert layouts.prune(["elsewhere:5000"]) == [a] and layouts.by_host == {}


def test_a_layout_is_served_while_something_reads_through_it(
    layouts: tuple[Path, Path], tmp_path: Path
) -> None:
    """The service stops serving a layout once no open image reads through its host and no
    recently released one that a remount would reuse does; a failed open's goes at once."""
    _, converted = layouts
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    served = start_service(tmp_path / "svc")  # a cache of its own: reads go to the layout

    def dropped(path: Path) -> bool:
        return f"no longer serving the OCI layout {path}\n" in served.log.read_text()

    try:
        first, second = tmp_path / "m1", tmp_path / "m2"
        _mount(served, f"oci:{converted}:chunked", first)
        _mount(served, f"oci:{copy}:chunked", second)  # the same image, read through the first
        assert dropped(copy) and not dropped(converted)
        run_lazyfs("umount", "--socket", str(served.socket), str(first))
        read_all(second, FILES, threads=2)  # still served: the open image reads through it
        assert json.loads(run_lazyfs("stats", str(second), "--json").stdout)["bytes_fetched"] > 0
        run_lazyfs("umount", "--socket", str(served.socket), str(second))
        assert not dropped(converted)  # released, but a remount would reuse the image
        for index in range(RECENT_IMAGES_MAX):  # as many other images released after it
            other = write_image(tmp_path / f"l{index}", "v1", [[regular_file("f", b"%d" % index)]])
            mountpoint = tmp_path / f"o{index}"
            _mount(served, other.reference, mountpoint)
            run_lazyfs("umount", "--socket", str(served.socket), str(mountpoint))
        assert dropped(converted) and not dropped(tmp_path / f"l{RECENT_IMAGES_MAX - 1}")
        big = OciLayout.create(tmp_path / "big")
        data = b"{" + b" " * (5 << 20) + b"}"
        big.tag(Descriptor(OCI_MANIFEST, big.add_blob_bytes(data), len(data)), "big")
        failed = run_lazyfs(
            "mount", "--socket", str(served.socket), f"oci:{big.path}:big", str(tmp_path / "m1"),
            check=False,
        )  # fmt: skip
        assert failed.returncode != 0 and dropped(big.path)
    finally:
        stop(served)
