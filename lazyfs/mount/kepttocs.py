"""Checked TOCs kept in the cache, so that the next open of a layer skips the JSON.

Parsing and checking a zstd:chunked TOC (formats/chunked/toc.py) costs about 15 µs an entry:
most of the first open of a cached image in a service that has just started (a restart, or a
service ``lazyfs mount`` started on demand). Once a TOC has passed every check, its entries are
kept as ``marshal`` data of their attribute dicts (about 4 ms to load per 1,000 entries, a
quarter of a parse), under a key that names the TOC's checksum and the blob end the check used
(``keys.kept_toc_key``). The record carries the version of the checks it passed
(``toc.CHECKS_VERSION``: a change of the checks parses again) and the entry fields, and a
sha256 of itself: a torn or changed record is ignored, and the TOC read and parsed again.

Only this module writes such records, and only from a ``Toc`` that ``Toc.parse`` checked.
``marshal`` is not safe against crafted data, so nothing an image publisher controls is ever
loaded this way: the record's bytes come from the service itself, behind their sha256.

The write is off the mount's critical path: ``open_image`` hands the parsed TOCs on
(``OpenedImage.unkept``) and the mounted image's background task keeps them (``keep``).
"""

from __future__ import annotations

import hashlib
import logging
import marshal
from dataclasses import fields
from typing import Any

from lazyfs.cache.store import ChunkCache
from lazyfs.formats.chunked.toc import CHECKS_VERSION, Toc, TocEntry, trusted_entry

log = logging.getLogger(__name__)

_FORMAT = 1
_ATTRIBUTES = tuple(f.name for f in fields(TocEntry))
_DIGEST_BYTES = 32
_HEADER = (_FORMAT, CHECKS_VERSION, _ATTRIBUTES)


def encode(toc: Toc) -> bytes:
    """The record of a checked ``toc``: its sha256, then the marshalled fields."""
    entries = [vars(entry) for entry in toc.entries]
    payload = marshal.dumps((*_HEADER, toc.tar_split_digest, toc.version, entries))
    return hashlib.sha256(payload).digest() + payload


def decode(record: bytes) -> Toc | None:
    """The TOC a record holds; None for one torn, changed, or kept by another version."""
    digest, payload = record[:_DIGEST_BYTES], record[_DIGEST_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        kept: Any = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    if not (type(kept) is tuple and len(kept) == len(_HEADER) + 3 and kept[:-3] == _HEADER):
        return None
    tar_split_digest, version, entries = kept[-3:]
    if type(tar_split_digest) is not str or type(version) is not int or type(entries) is not list:
        return None
    if not all(type(e) is dict and len(e) == len(_ATTRIBUTES) for e in entries):
        return None
    return Toc(tuple(map(trusted_entry, entries)), tar_split_digest, version)


def load(cache: ChunkCache, key: str) -> Toc | None:
    """Worker thread: the TOC kept under ``key``, if a sound record is there."""
    record = cache.get_meta(key)
    return decode(record) if record is not None else None


def keep(cache: ChunkCache, unkept: list[tuple[str, Toc]]) -> None:
    """Worker thread: keep each (key, checked TOC) of ``unkept``, emptying it as it goes (the
    TOCs are released once kept)."""
    while unkept:
        key, toc = unkept.pop()
        cache.put_meta(key, encode(toc))
    log.debug("kept the checked TOCs of an image")
