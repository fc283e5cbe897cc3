"""A small sample image, built locally and reproducibly, for ``lazyfs demo``.

Two gzip layers written with tarfile: a base with a few text files, a directory tree and one
larger file, and an upper layer that adds an app and deletes a base file with a whiteout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from pathlib import Path

from lazyfs.convert.layout import OciLayout
from lazyfs.model import manifests
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, ImageConfig
from lazyfs.model.platform import Platform

_MTIME = 1_700_000_000
_WORDS = b"lazy chunk verity layer image registry mount fetch cache digest merkle tree".split()


def _text(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(_WORDS, k=12)) + b"\n"
    return bytes(out[:size])


def _base_files() -> dict[str, bytes]:
    files = {
        "etc/os-release": b'NAME="lazyfs sample"\nID=lazyfs\n',
        "etc/motd": b"Hello from a lazily mounted image.\n",
        "usr/share/data/big.txt": _text(8 << 20, 1),
    }
    files.update({f"usr/lib/sample/module{i:03d}.txt": _text(4096 + 97 * i, i) for i in range(200)})
    return files


def _layer(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories = sorted({str(Path(p).parent) for p in files} - {"."})
        for directory in directories:
            for parent in reversed(Path(directory).parents[:-1]):
                _add(archive, str(parent) + "/", None)
            _add(archive, directory + "/", None)
        for path in sorted(files):
            _add(archive, path, files[path])
        for path in whiteouts:
            _add(archive, f"{Path(path).parent}/.wh.{Path(path).name}", b"")
    return raw.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes | None) -> None:
    if name.rstrip("/") in archive.getnames():
        return
    info = tarfile.TarInfo(name.rstrip("/"))
    info.mtime = _MTIME
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(info)
        return
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


def build_sample_image(layout_dir: Path, tag: str = "latest") -> Digest:
    """Write the sample image into an OCI layout; return its manifest digest."""
    layout = OciLayout.create(layout_dir)
    tars = [
        _layer(_base_files()),
        _layer({"app/run.sh": b"#!/bin/sh\ncat /etc/motd\n"}, whiteouts=("etc/os-release",)),
    ]
    layers = [_add_layer(layout, tar) for tar in tars]
    diff_ids = [Digest("sha256", hashlib.sha256(tar).hexdigest()) for tar in tars]
    config = _config(diff_ids)
    return layout.add_image(config, layers, tag)


def _add_layer(layout: OciLayout, tar: bytes) -> Descriptor:
    blob = gzip.compress(tar, mtime=0)
    digest = layout.add_blob_bytes(blob)
    return Descriptor(media_type=manifests.OCI_LAYER_TAR_GZIP, digest=digest, size=len(blob))


def _config(diff_ids: list[Digest]) -> bytes:
    host = Platform.host()
    fields: dict[str, object] = {
        "architecture": host.architecture,
        "os": host.os,
        "config": {"Cmd": ["/bin/sh", "/app/run.sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return ImageConfig(fields).with_diff_ids(diff_ids).to_bytes()
