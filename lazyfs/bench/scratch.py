"""A benchmark's scratch directory: ``--work-dir`` as given, or a new one removed after."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Scratch goes to /var/tmp, on disk, where there is one: /tmp may be a small tmpfs.
_BASE = Path("/var/tmp")


@contextlib.contextmanager
def work_dir(requested: Path | None, prefix: str) -> Iterator[Path]:
    """``requested`` (created, and kept), else a new ``PREFIX*`` directory, removed at the end."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_BASE if _BASE.is_dir() else None))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
