"""Test images built with lazyfs's image builder (:mod:`lazyfs.convert.imagebuild`).

Ready-made images: :func:`build_feature_image` (every kind of tar entry, whiteouts and opaque
directories across three layers) and :func:`build_big_image` (about ``total_bytes`` of many
files). :func:`build_umoci_image` builds an image from the same descriptions with umoci, an
independent tool, to check the builder against; :func:`materialize` creates entries as real
files. :func:`layout_manifest` and :func:`layout_tocs` read back what a layout holds.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import zstandard
from oracles import require_tool, run_tool

from lazyfs.convert.imagebuild import (
    BuiltImage,
    Entry,
    block_device,
    char_device,
    directory,
    fifo,
    hardlink,
    opaque_whiteout,
    regular_file,
    symlink,
    tar_order,
    whiteout,
    with_parent_dirs,
    write_image,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.formats.chunked.toc import TOC_POSITION_ANNOTATION, Toc, parse_toc_position
from lazyfs.model.manifests import LayerCompression, Manifest

KIB = 1024
MIB = 1024 * KIB


# --- the feature image -------------------------------------------------------------------------

# VFS_CAP_REVISION_2 with the effective flag, permitting CAP_NET_RAW (bit 13): what setcap writes
# for "cap_net_raw+ep".
CAP_NET_RAW_XATTR = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
LONG_DIR = "data/long-" + "x" * 150  # needs a PAX path record


def text_bytes(size: int, seed: int) -> bytes:
    """``size`` bytes of compressible, text-like data, different for each seed."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(512)
    ]
    line_count = size // 40 + 1
    lines = (" ".join(rng.choices(words, k=7)) for _ in range(line_count))
    return "\n".join(lines).encode()[:size]


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def feature_layers() -> list[list[Entry]]:
    """Three layers that use every entry kind, then delete, hide and replace across layers."""
    return [_feature_base_layer(), _feature_second_layer(), _feature_third_layer()]


def _feature_base_layer() -> list[Entry]:
    return [
        directory("etc"),
        regular_file("etc/hostname", b"base\n"),
        regular_file(
            "etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"
        ),
        symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),  # absolute and dangling
        directory("usr"),
        directory("usr/bin"),
        regular_file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        hardlink("usr/bin/tool-alias", "usr/bin/tool"),
        symlink("usr/bin/sh", "tool"),
        regular_file("usr/bin/su", b"\x7fELF setuid", 0o4755),
        regular_file("usr/bin/wall", b"\x7fELF setgid", 0o2755, gid=5),
        regular_file(
            "usr/bin/ping",
            b"\x7fELF caps",
            0o755,
            xattrs={"security.capability": CAP_NET_RAW_XATTR},
        ),
        directory("tmp", 0o1777),
        directory("home"),
        directory("home/user", 0o700, uid=1000, gid=1000),
        regular_file("home/user/.profile", b"export PS1='$ '\n", 0o600, uid=1000, gid=1000),
        regular_file(
            "home/user/notes.txt",
            b"notes\n",
            uid=1000,
            gid=1000,
            xattrs={"user.comment": b"hello", "user.binary": bytes(range(256))},
        ),
        directory("dev"),
        char_device("dev/null", 1, 3),
        char_device("dev/zero", 1, 5),
        block_device("dev/loop0", 7, 0),
        fifo("dev/initctl", 0o600),
        directory("data"),
        regular_file("data/empty"),
        regular_file("data/small.txt", b"hello world\n"),
        regular_file("data/big-text.txt", text_bytes(3 * MIB + 17, seed=1)),
        regular_file("data/big-random.bin", random_bytes(2 * MIB + 5, seed=2)),
        regular_file("data/zeros.bin", bytes(1 * MIB) + b"end"),
        regular_file("data/ünïcödé-名前.txt", "ünïcödé\n".encode()),
        directory(LONG_DIR),
        regular_file(f"{LONG_DIR}/file", b"long path\n"),
        directory("data/hl"),
        regular_file("data/hl/one", b"three names, one inode\n"),
        hardlink("data/hl/two", "data/hl/one"),
        hardlink("data/hl/three", "data/hl/one"),
        directory("opaque", xattrs={"user.dirattr": b"kept"}),
        regular_file("opaque/old-a", b"hidden by the opaque marker\n"),
        directory("opaque/old-sub"),
        regular_file("opaque/old-sub/deep", b"hidden too\n"),
        directory("gone"),
        regular_file("gone/file", b"deleted with its directory\n"),
        directory("gone/sub"),
        regular_file("gone/sub/x"),
        regular_file("remove-me.txt", b"deleted in layer 2\n"),
        regular_file("becomes-dir", b"a file in layer 1\n"),
        directory("becomes-file"),
        regular_file("becomes-file/child"),
    ]


def _feature_second_layer() -> list[Entry]:
    return [
        whiteout("remove-me.txt"),
        whiteout("gone"),
        opaque_whiteout("opaque"),
        regular_file("opaque/new-b", b"added with the opaque marker\n"),
        directory("etc"),
        regular_file("etc/hostname", b"layer2\n"),
        directory("becomes-dir"),
        regular_file("becomes-dir/inner", b"inside\n"),
        regular_file("becomes-file", b"now a file\n"),
        directory("data"),
        regular_file("data/added-in-2.txt", b"deleted in layer 3\n"),
        directory("home/user", 0o750, uid=1000, gid=1000),
        regular_file(
            "home/user/notes.txt",
            b"notes v2\n",
            uid=1000,
            gid=1000,
            xattrs={"user.comment": b"changed"},
        ),
    ]


def _feature_third_layer() -> list[Entry]:
    return [
        directory("data"),
        whiteout("data/added-in-2.txt"),
        regular_file("data/small.txt", b"hello world\n", 0o600, uid=1, gid=1),
        symlink("data/link-to-big", "big-text.txt"),
        regular_file("data/l3-file", b"layer 3 hardlink\n"),
        hardlink("data/l3-link", "data/l3-file"),
        directory("gone"),
        regular_file("gone/reborn", b"recreated after the whiteout\n"),
        regular_file("opaque/new-c", b"layer 3\n"),
    ]


def build_feature_image(
    layout_dir: Path, tag: str, compression: LayerCompression = "gzip"
) -> BuiltImage:
    """The three :func:`feature_layers` as an image (a few MiB)."""
    return write_image(layout_dir, tag, feature_layers(), compression)


# --- the big image -----------------------------------------------------------------------------


def _file_size(rng: random.Random) -> int:
    """Mostly small files, some medium, a few large: roughly a distro image's shape."""
    bucket = rng.random()
    if bucket < 0.85:
        return rng.randint(0, 16 * KIB)
    if bucket < 0.98:
        return rng.randint(16 * KIB, 256 * KIB)
    return rng.randint(256 * KIB, 6 * MIB)


def _text_from_corpus(corpus: bytes, size: int, rng: random.Random) -> bytes:
    """Text made of random slices of ``corpus``: compressible, and fast to make."""
    pieces = []
    remaining = size
    while remaining > 0:
        length = min(remaining, rng.randint(1 * KIB, 8 * KIB))
        start = rng.randrange(len(corpus) - length)
        pieces.append(corpus[start : start + length])
        remaining -= length
    return b"".join(pieces)


def _big_file_data(rng: random.Random, corpus: bytes) -> tuple[bytes, str]:
    """Half text-like, half random data; with the file suffix that says which."""
    size = _file_size(rng)
    if rng.random() < 0.5:
        return _text_from_corpus(corpus, size, rng), "txt"
    return rng.randbytes(size), "bin"


def big_image_layers(total_bytes: int, layer_count: int = 3, seed: int = 0) -> list[list[Entry]]:
    """About ``total_bytes`` of file data in ``layer_count`` layers; about a tenth of the files
    of each upper layer repeat earlier content, at the same path or a new one."""
    rng = random.Random(seed)
    corpus = text_bytes(1 * MIB, seed=seed + 1)
    layers: list[list[Entry]] = [[] for _ in range(layer_count)]
    earlier: list[Entry] = []
    written = 0
    index = 0
    while written < total_bytes:
        layer = min(layer_count - 1, written * layer_count // total_bytes)
        entry = _big_entry(rng, corpus, layer, index, earlier)
        layers[layer].append(entry)
        written += len(entry.data)
        index += 1
        if layer == 0 or rng.random() < 0.3:
            earlier.append(entry)
    return [with_parent_dirs(entries) for entries in layers]


def _big_entry(
    rng: random.Random, corpus: bytes, layer: int, index: int, earlier: Sequence[Entry]
) -> Entry:
    if layer > 0 and earlier and rng.random() < 0.1:
        original = rng.choice(earlier)
        same_path = rng.random() < 0.5
        path = original.path if same_path else f"layer{layer}/shared/copy{index}"
        return regular_file(path, original.data, original.mode)
    data, suffix = _big_file_data(rng, corpus)
    return regular_file(
        f"layer{layer}/dir{index % 37:02d}/file{index:05d}.{suffix}",
        data,
        rng.choice((0o644, 0o755)),
    )


def build_big_image(
    layout_dir: Path,
    tag: str,
    total_bytes: int,
    compression: LayerCompression = "gzip",
    *,
    seed: int = 0,
) -> BuiltImage:
    """An image of about ``total_bytes`` of file data in three layers (see big_image_layers)."""
    return write_image(layout_dir, tag, big_image_layers(total_bytes, seed=seed), compression)


# --- materialising entries and umoci -----------------------------------------------------------


def materialize(entries: Iterable[Entry], root: Path) -> None:
    """Create ``entries`` as real files under ``root`` (as root: owners, devices, caps)."""
    for entry in tar_order(entries):
        if entry.is_whiteout:
            raise ValueError(f"{entry.path}: whiteouts have no on-disk form here")
        _create(entry, root / entry.path, root)
        if entry.type != "hardlink":
            _apply_metadata(entry, root / entry.path)


def _create(entry: Entry, path: Path, root: Path) -> None:
    if entry.type == "dir":
        path.mkdir(exist_ok=True)
    elif entry.type == "file":
        path.write_bytes(entry.data)
    elif entry.type == "symlink":
        path.symlink_to(entry.link)
    elif entry.type == "hardlink":
        os.link(root / entry.link, path, follow_symlinks=False)
    elif entry.type == "fifo":
        os.mkfifo(path)
    else:
        kind = 0o020000 if entry.type == "char" else 0o060000
        os.mknod(path, kind | entry.mode, os.makedev(*entry.device))


def _apply_metadata(entry: Entry, path: Path) -> None:
    # chown clears setuid bits and file capabilities, so: owner, then mode, then xattrs.
    os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
    if entry.type != "symlink":
        os.chmod(path, entry.mode)
    for name, value in entry.xattrs.items():
        os.setxattr(path, name, value, follow_symlinks=False)


def build_umoci_image(layout_dir: Path, tag: str, entries: Sequence[Entry], work_dir: Path) -> None:
    """An independent single-layer image of ``entries``: umoci new, unpack, fill, repack."""
    umoci = require_tool("umoci")
    if not layout_dir.exists():
        run_tool([umoci, "init", "--layout", layout_dir])
    image = f"{layout_dir}:{tag}"
    run_tool([umoci, "new", "--image", image])
    bundle = work_dir / f"umoci-bundle-{tag}"
    run_tool([umoci, "unpack", "--image", image, bundle])
    materialize(entries, bundle / "rootfs")
    run_tool([umoci, "repack", "--image", image, bundle])
    shutil.rmtree(bundle)


def layout_manifest(layout: OciLayout, tag: str = "v1") -> Manifest:
    """The manifest tagged ``tag`` in an OCI layout."""
    descriptor = layout.resolve(tag)
    return Manifest.parse(layout.read_blob(descriptor.digest), descriptor.media_type)


def layout_tocs(layout: OciLayout, tag: str = "v1") -> list[Toc]:
    """Each layer's zstd:chunked TOC, read where its annotation says."""
    tocs = []
    for layer in layout_manifest(layout, tag).layers:
        section = parse_toc_position(layer.annotations[TOC_POSITION_ANNOTATION])
        compressed = layout.read_blob(layer.digest)[section.offset : section.end]
        raw = zstandard.ZstdDecompressor().decompress(
            compressed, max_output_size=section.uncompressed_length
        )
        tocs.append(Toc.parse(raw))
    return tocs
