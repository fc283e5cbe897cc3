"""Local files that fetched bytes go into and uploaded bytes come from. A leaf module.

``AtomicFile`` writes beside its destination and gets the final name only by ``os.replace``, so
a reader never sees a partial file; nothing is fsynced (what is written here is verified by
digest, and a lost file is fetched again). ``ExactReader`` and ``read_exactly`` read a file the
caller gave a size for, and fail if it is shorter.

OSError stops here: write failures become CacheError, read failures LayoutError.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from lazyfs.errors import CacheError, LayoutError


class AtomicFile:
    """A temp file beside ``dest``: ``write``, then ``commit`` (into place) or ``discard``.

    As a context manager it discards whatever was not committed. ``what`` starts the message of
    a write failure (default: the destination).
    """

    def __init__(self, dest: Path, what: str | None = None, *, mode: int | None = None) -> None:
        self.dest = dest
        self._what = what or str(dest)
        self._temp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        self._file: IO[bytes] | None = _open_for_writing(self._temp)
        if mode is not None:  # before any byte is written: a secret is never readable
            os.fchmod(self._file.fileno(), mode)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError(f"{self._what}: write after commit or discard")
        try:
            self._file.write(data)
        except OSError as exc:
            self.discard()
            raise CacheError(f"{self._what}: cannot write to disk: {exc.strerror}") from exc

    def commit(self) -> None:
        """Move the written bytes to ``dest`` (replacing any file there)."""
        if self._file is None:
            raise ValueError(f"{self._what}: commit after commit or discard")
        try:
            self._file.close()
        except OSError as exc:
            self.discard()
            raise CacheError(f"{self._what}: cannot write to disk: {exc.strerror}") from exc
        self._file = None
        try:
            os.replace(self._temp, self.dest)
        except OSError as exc:
            _remove(self._temp)
            raise CacheError(f"cannot rename {self._temp} to {self.dest}: {exc.strerror}") from exc

    def discard(self) -> None:
        """Drop the temp file; a no-op after ``commit`` or an earlier ``discard``."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = None
        _remove(self._temp)


class ExactReader:
    """Reads a local file in pieces of exactly the asked size (the chunks of an upload)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = _open_for_reading(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes; LayoutError if the file ends first."""
        try:
            chunk = self._file.read(size)
        except OSError as exc:
            raise LayoutError(f"cannot read {self.path}: {exc.strerror}") from exc
        if len(chunk) != size:
            raise LayoutError(f"{self.path} is shorter than the size given for it")
        return chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):  # read-only: nothing is lost on a failed close
            self._file.close()


def read_exactly(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of ``path``; LayoutError if it is shorter or unreadable."""
    with ExactReader(path) as reader:
        return reader.read(size)


def _open_for_writing(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as exc:
        raise CacheError(f"cannot write {path}: {exc.strerror}") from exc


def _open_for_reading(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise LayoutError(f"cannot read {path}: {exc.strerror}") from exc


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
