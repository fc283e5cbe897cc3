"""OCI content digests (``sha256:<hex>``): parsing, computing and checking.

A pure leaf: no I/O beyond hashing bytes handed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lazyfs.errors import IntegrityError, ManifestError

# hashlib is imported where it hashes: `lazyfs mount`, a client that parses references and
# hashes nothing, would pay ~5 ms at every start for it.
if TYPE_CHECKING:
    import hashlib

_DIGEST_RE = re.compile(r"^(sha256):([a-f0-9]{64})$|^(sha512):([a-f0-9]{128})$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated ``algorithm:hex`` content digest."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST_RE.fullmatch(text)
        if match is None:
            raise ManifestError(f"invalid digest {text!r}")
        algorithm, hex_ = text.split(":", 1)
        return cls(algorithm, hex_)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        import hashlib

        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        import hashlib

        return hashlib.new(self.algorithm)

    def verify(self, data: bytes, what: str) -> None:
        """Raise IntegrityError unless ``data`` hashes to this digest."""
        import hashlib

        actual = hashlib.new(self.algorithm, data).hexdigest()
        if actual != self.hex:
            raise IntegrityError(what, str(self), f"{self.algorithm}:{actual}")


class DigestingWriter:
    """Accumulates a running digest and byte count of data passed through ``update``."""

    def __init__(self, algorithm: str = "sha256") -> None:
        import hashlib

        self._hash = hashlib.new(algorithm)
        self._algorithm = algorithm
        self.size_bytes = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.size_bytes += len(data)

    def digest(self) -> Digest:
        return Digest(self._algorithm, self._hash.hexdigest())

    def check(self, expected: Digest, what: str) -> None:
        actual = self.digest()
        if actual != expected:
            raise IntegrityError(what, str(expected), str(actual))
