"""Pins: chunks kept from eviction for the images they belong to (``lazyfs pin``).

Pins are two tables inside the chunk store's own SQLite database, beside diskcache's ``Cache``
table (diskcache never touches other tables). Eviction is lazyfs code (store.py) that selects
its victims with ``NOT EXISTS`` a pin, in the same ``BEGIN IMMEDIATE`` transaction that deletes
them: so a pin committed by any process (the CLI next to a running service) holds for every
later eviction of every process, and pinning and evicting never interleave.

A pin records each chunk's uncompressed size, cached or not yet: pinned bytes are what the pinned
images take once fetched, and that is what is checked against the bound.

Every function runs inside a transaction of the chunk store, on its connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS LazyfsPin ("
    " key TEXT NOT NULL, image TEXT NOT NULL, size INTEGER NOT NULL,"
    " PRIMARY KEY (key, image)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS LazyfsPin_image ON LazyfsPin (image)",
    "CREATE TABLE IF NOT EXISTS LazyfsPinnedImage ("
    " image TEXT PRIMARY KEY, reference TEXT NOT NULL, chunks INTEGER NOT NULL,"
    " bytes INTEGER NOT NULL, unresolved INTEGER NOT NULL, pinned_at REAL NOT NULL)",
)

# Victims for eviction: least recently used first, never a pinned chunk.
UNPINNED_LRU = (
    "SELECT rowid, filename, size FROM Cache"
    " WHERE NOT EXISTS (SELECT 1 FROM LazyfsPin WHERE LazyfsPin.key = Cache.key)"
    " ORDER BY access_time LIMIT ?"
)


@dataclass(frozen=True)
class PinnedImage:
    image: str  # the manifest digest
    reference: str  # as it was pinned
    chunks: int
    bytes: int  # uncompressed bytes of its chunks, cached or not
    unresolved: int  # chunks whose cache key was not known yet (not pinned)


@dataclass(frozen=True)
class PinTotals:
    images: int
    chunks: int  # distinct pinned chunks
    bytes: int  # their uncompressed bytes, cached or not
    cached_chunks: int
    cached_bytes: int


def create(con: sqlite3.Connection) -> None:
    for statement in SCHEMA:
        con.execute(statement)


def replace(
    con: sqlite3.Connection, pinned: PinnedImage, chunks: Sequence[tuple[str, int]], now: float
) -> None:
    """Pin ``chunks`` (key, size) for ``pinned.image``, replacing an earlier pin of it."""
    remove_image(con, pinned.image)
    con.execute(
        "INSERT INTO LazyfsPinnedImage VALUES (?, ?, ?, ?, ?, ?)",
        (pinned.image, pinned.reference, pinned.chunks, pinned.bytes, pinned.unresolved, now),
    )
    con.executemany(
        "INSERT OR REPLACE INTO LazyfsPin VALUES (?, ?, ?)",
        [(key, pinned.image, size) for key, size in chunks],
    )


def remove_image(con: sqlite3.Connection, image: str) -> None:
    con.execute("DELETE FROM LazyfsPin WHERE image = ?", (image,))
    con.execute("DELETE FROM LazyfsPinnedImage WHERE image = ?", (image,))


def find(con: sqlite3.Connection, reference: str, image: str | None) -> list[str]:
    """The pinned images ``reference`` names: pinned under that name, or its digest."""
    rows = con.execute(
        "SELECT image FROM LazyfsPinnedImage WHERE reference = ? OR image = ?",
        (reference, image or ""),
    ).fetchall()
    return [str(image) for (image,) in rows]


def images(con: sqlite3.Connection) -> list[PinnedImage]:
    rows = con.execute(
        "SELECT image, reference, chunks, bytes, unresolved FROM LazyfsPinnedImage"
        " ORDER BY reference"
    ).fetchall()
    return [PinnedImage(str(a), str(b), int(c), int(d), int(e)) for a, b, c, d, e in rows]


def pinned_bytes(con: sqlite3.Connection) -> int:
    """Uncompressed bytes of every distinct pinned chunk, cached or not."""
    ((total,),) = con.execute(
        "SELECT COALESCE(SUM(size), 0) FROM (SELECT MAX(size) AS size FROM LazyfsPin GROUP BY key)"
    ).fetchall()
    return int(total)


def totals(con: sqlite3.Connection) -> PinTotals:
    ((count,),) = con.execute("SELECT COUNT(*) FROM LazyfsPinnedImage").fetchall()
    ((chunks,),) = con.execute("SELECT COUNT(DISTINCT key) FROM LazyfsPin").fetchall()
    ((cached, cached_bytes),) = con.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM Cache"
        " WHERE EXISTS (SELECT 1 FROM LazyfsPin WHERE LazyfsPin.key = Cache.key)"
    ).fetchall()
    return PinTotals(int(count), int(chunks), pinned_bytes(con), int(cached), int(cached_bytes))


def clear(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM LazyfsPin")
    con.execute("DELETE FROM LazyfsPinnedImage")
