"""lazyfs.model.verity against the real ``fsverity digest`` CLI (fsverity-utils) as the oracle."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from lazyfs.errors import TocError, UsageError
from lazyfs.model.verity import (
    BLOCK_SIZE_BYTES,
    VerityHasher,
    format_verity,
    fsverity_digest,
    parse_verity,
)

MIB = 1024 * 1024
SIZES = [0, 1, 4095, 4096, 4097, 2 * 4096, 129 * 4096, MIB + 1, 5 * MIB + 123]
SALTS = [b"", b"\x01", b"lazyfs-salt", bytes(range(32))]
EMPTY_DIGEST = "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"


@pytest.fixture(scope="module")
def fsverity_cli() -> str:
    """Path of the oracle; CI must have it, so there a missing CLI fails instead of skipping."""
    path = shutil.which("fsverity")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("fsverity CLI missing in CI (install the Debian package `fsverity`)")
        pytest.skip("fsverity CLI not installed (Debian package `fsverity`)")
    return path


def cli_digest(cli: str, path: Path, salt: bytes) -> str:
    args = [cli, "digest", str(path)]
    if salt:
        args += ["--salt", salt.hex()]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def make_data(size: int, kind: str) -> bytes:
    if kind == "zeros":
        return bytes(size)
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("salt", SALTS, ids=lambda s: f"salt{len(s)}")
@pytest.mark.parametrize("kind", ["random", "zeros"])
@pytest.mark.parametrize("size", SIZES)
def test_matches_fsverity_cli(
    fsverity_cli: str, tmp_path: Path, size: int, kind: str, salt: bytes
) -> None:
    data = make_data(size, kind)
    path = tmp_path / "data"
    path.write_bytes(data)
    assert format_verity(fsverity_digest(data, salt)) == cli_digest(fsverity_cli, path, salt)


@pytest.mark.parametrize("salt", [b"", b"pepper"])
def test_streaming_in_odd_pieces_equals_one_shot(salt: bytes) -> None:
    data = make_data(3 * MIB + 4321, "random")
    rng = random.Random(7)
    hasher = VerityHasher(salt)
    offset = 0
    while offset < len(data):
        step = rng.choice([1, 7, 4095, 4096, 4097, 65537, 300_001])
        hasher.update(memoryview(data)[offset : offset + step])
        offset += step
    assert hasher.size_bytes == len(data)
    assert hasher.digest() == fsverity_digest(data, salt)


def test_digest_does_not_consume_state() -> None:
    hasher = VerityHasher()
    hasher.update(b"a" * 5000)
    first = hasher.digest()
    assert hasher.digest() == first
    hasher.update(b"b" * 3000)
    assert hasher.digest() == fsverity_digest(b"a" * 5000 + b"b" * 3000)


def test_empty_digest_is_known_value() -> None:
    assert format_verity(fsverity_digest(b"")) == EMPTY_DIGEST


def test_block_size_constant() -> None:
    assert BLOCK_SIZE_BYTES == 4096


def test_salt_too_long_rejected() -> None:
    with pytest.raises(UsageError):
        VerityHasher(bytes(33))


def test_format_parse_round_trip() -> None:
    raw = fsverity_digest(b"hello")
    assert parse_verity(format_verity(raw)) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256:",
        "sha512:" + "0" * 64,
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "A" * 64,
        "sha256:" + "0" * 64 + "\n",
        "0" * 64,
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(TocError):
        parse_verity(text)
