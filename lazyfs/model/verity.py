"""Userspace fs-verity file digests (SHA-256, 4096-byte Merkle blocks, optional salt).

The result equals what ``fsverity digest`` prints and what the kernel's
``FS_IOC_MEASURE_VERITY`` reports, so chunks can be named and checked without kernel
support. Algorithm: Linux ``Documentation/filesystems/fsverity.rst``.

Speed: only level 0 touches the data; it is hashed block by block through memoryview
slices (hashlib releases the GIL for them), and only its hashes are kept. The upper
levels are ~1/128 of the work and are built when the digest is asked for.
"""

from __future__ import annotations

import hashlib
import re
import struct

from lazyfs.errors import TocError, UsageError

BLOCK_SIZE_BYTES = 4096
HASH_SIZE_BYTES = 32
MAX_SALT_BYTES = 32

_LOG_BLOCK_SIZE = 12
_FSVERITY_VERSION = 1
_FSVERITY_HASH_ALG_SHA256 = 1
_SHA256_BLOCK_BYTES = 64
# version, hash_algorithm, log_blocksize, salt_size, reserved u32, data_size u64,
# root_hash[64], salt[32], reserved[144]: 256 bytes, little-endian.
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")
_TEXT_RE = re.compile(r"sha256:([0-9a-f]{64})")
_ZERO_BLOCK = bytes(BLOCK_SIZE_BYTES)


class _BlockHasher:
    """Hashes whole blocks, each prefixed by the padded salt when there is one."""

    def __init__(self, salt: bytes) -> None:
        self._salted = _salted_prefix(salt) if salt else None

    def hash_blocks(self, view: memoryview) -> bytes:
        """Concatenated hashes of ``view``, whose length must be a multiple of the block size."""
        starts = range(0, len(view), BLOCK_SIZE_BYTES)
        if self._salted is None:
            sha256 = hashlib.sha256
            return b"".join([sha256(view[i : i + BLOCK_SIZE_BYTES]).digest() for i in starts])
        return b"".join([self._salted_hash(view[i : i + BLOCK_SIZE_BYTES]) for i in starts])

    def _salted_hash(self, block: memoryview) -> bytes:
        assert self._salted is not None
        hasher = self._salted.copy()
        hasher.update(block)
        return hasher.digest()


def _salted_prefix(salt: bytes) -> hashlib._Hash:
    """A SHA-256 state that has absorbed the salt, zero-padded to SHA-256's block size."""
    padded_len = -(-len(salt) // _SHA256_BLOCK_BYTES) * _SHA256_BLOCK_BYTES
    return hashlib.sha256(salt.ljust(padded_len, b"\0"))


def _check_salt(salt: bytes) -> None:
    if len(salt) > MAX_SALT_BYTES:
        raise UsageError(f"fs-verity salt is {len(salt)} bytes; at most {MAX_SALT_BYTES} allowed")


class VerityHasher:
    """Streaming fs-verity digest; ``update`` accepts data in pieces of any size.

    ``digest`` does not consume the state, so it may be called at any point.
    """

    def __init__(self, salt: bytes = b"") -> None:
        _check_salt(salt)
        self._salt = bytes(salt)
        self._blocks = _BlockHasher(self._salt)
        self._level0 = bytearray()
        self._pending = bytearray()
        self._size_bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes passed to ``update`` so far."""
        return self._size_bytes

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._size_bytes += len(view)
        if self._pending:
            view = self._fill_pending(view)
        whole = len(view) - len(view) % BLOCK_SIZE_BYTES
        if whole:
            self._level0 += self._blocks.hash_blocks(view[:whole])
        self._pending += view[whole:]

    def _fill_pending(self, view: memoryview) -> memoryview:
        """Top up the buffered partial block; hash it once full. Returns the unused rest."""
        take = BLOCK_SIZE_BYTES - len(self._pending)
        self._pending += view[:take]
        if len(self._pending) == BLOCK_SIZE_BYTES:
            self._level0 += self._blocks.hash_blocks(memoryview(self._pending))
            self._pending.clear()
        return view[take:]

    def root_hash(self) -> bytes:
        """The Merkle tree root; all zeros for empty data."""
        if self._size_bytes == 0:
            return bytes(HASH_SIZE_BYTES)
        level = bytes(self._level0)
        if self._pending:
            level += self._blocks.hash_blocks(memoryview(_pad_block(bytes(self._pending))))
        while len(level) > HASH_SIZE_BYTES:
            level = self._blocks.hash_blocks(memoryview(_pad_block(level)))
        return level

    def descriptor(self) -> bytes:
        """The 256-byte fs-verity descriptor whose SHA-256 is the file digest."""
        return _DESCRIPTOR.pack(
            _FSVERITY_VERSION,
            _FSVERITY_HASH_ALG_SHA256,
            _LOG_BLOCK_SIZE,
            len(self._salt),
            0,
            self._size_bytes,
            self.root_hash(),
            self._salt,
        )

    def digest(self) -> bytes:
        """The 32-byte fs-verity file digest of everything passed to ``update``."""
        return hashlib.sha256(self.descriptor()).digest()


def _pad_block(data: bytes) -> bytes:
    """Zero-pad ``data`` up to a whole number of blocks."""
    tail = len(data) % BLOCK_SIZE_BYTES
    return data + _ZERO_BLOCK[tail:] if tail else data


def fsverity_digest(data: bytes | memoryview, salt: bytes = b"") -> bytes:
    """The 32-byte fs-verity file digest of ``data``."""
    hasher = VerityHasher(salt)
    hasher.update(data)
    return hasher.digest()


def format_verity(raw: bytes) -> str:
    """``sha256:<hex>``, the form ``fsverity digest`` prints."""
    return f"sha256:{raw.hex()}"


def parse_verity(text: str) -> bytes:
    """Inverse of :func:`format_verity`; TocError unless ``text`` is ``sha256:`` + 64 hex."""
    match = _TEXT_RE.fullmatch(text)
    if match is None:
        raise TocError(f"invalid fs-verity digest {text!r}")
    return bytes.fromhex(match.group(1))
