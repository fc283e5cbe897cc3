"""The zstd:chunked table of contents (TOC), footer and annotations. A pure leaf.

Format facts (containers/storage ``pkg/chunked/internal/minimal``; see docs/format.md):

- The TOC is ``{"version":1,"entries":[...],"tarSplitDigest":"sha256:..."}``, zstd-compressed in
  a skippable frame. ``tarSplitDigest`` is the sha256 of the *compressed* tar-split.
- A regular file is one ``reg`` entry, followed by ``chunk`` entries when it has more than one
  chunk; then the ``chunk*`` fields are set on all of them, including the ``reg`` one. A chunk
  entry carries ``offset`` but no ``endOffset``: a chunk ends where the next one starts, the last
  one at the ``reg`` entry's ``endOffset``.
- Upstream readers ignore unknown fields. lazyfs adds ``lazyfsVerity`` (the whole file's
  fs-verity digest) on ``reg`` entries and ``lazyfsChunkVerity`` (the chunk's) on every entry
  that stands for a chunk, so every chunk is tied to an fs-verity digest; and, for images
  converted with an access profile, ``lazyfsPrefetch`` (the chunk's rank in the order a mount
  prefetches in) on the entries of the chunks the profiled workload read.

Serialization follows Go's ``encoding/json`` (field order of the Go struct, ``omitempty``, sorted
map keys, HTML-escaping of ``<>&``), so the bytes are reproducible and look like upstream's.

Parsing is the trust boundary (docs/reliability.md): the TOC checksum proves only that the TOC is
the one the image's author meant, so every field is checked against the range the kernel, FUSE
and the rest of lazyfs can represent, and the whole TOC against ``LimitsConfig``, before any entry
is used. A refusal is one ``TocError`` line naming the layer, the entry's index in ``entries``
(0-based), its name and the field.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import posixpath
import re
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from lazyfs.config import LimitsConfig
from lazyfs.errors import TocError

# Layer annotations (current containers/storage names).
TOC_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
TOC_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
# Older names, written by stargz-snapshotter's zstd:chunked writer.
LEGACY_TOC_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
LEGACY_TOC_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
# Marks layers whose TOC carries lazyfs fs-verity digests for every chunk and file.
VERITY_ANNOTATION = "io.github.lazyfs.model.verity"
VERITY_ANNOTATION_VALUE = "fsverity-sha256-4096"

SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER_BYTES = 8
FOOTER_MAGIC = b"GNUlInUx"
LEGACY_FOOTER_MAGIC = b"GnUlInUx"
FOOTER_BYTES = 64
LEGACY_FOOTER_BYTES = 40
MANIFEST_TYPE_CRFS = 1

_SURROGATE = re.compile("[\ud800-\udfff]")
ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
CHUNK_TYPES = frozenset({"", "zeros"})  # containers/storage's ChunkTypeData and ChunkTypeZeros

# The real ranges of the fields (docs/reliability.md has the table).
MAX_INT64 = 2**63 - 1  # sizes and offsets: Go's int64, and st_size
MAX_ID = 2**32 - 1  # uid_t, gid_t
# FUSE hands st_rdev to the kernel in 32 bits, which it decodes as a 12-bit major and a 20-bit
# minor (new_decode_dev): larger numbers cannot be represented in a mount.
MAX_DEV_MAJOR = (1 << 12) - 1
MAX_DEV_MINOR = (1 << 20) - 1
# Permission bits with setuid, setgid and sticky, plus the file type bits some tar writers
# leave in the mode field (Go's c_IS* constants, the same values as S_IF*).
MAX_MODE = 0o177777
_MODE_TYPE_BITS = frozenset(
    {0, stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO}
    | {stat.S_IFSOCK}
)
MAX_PATH_BYTES = 4095  # PATH_MAX (4096) counts the terminating NUL
MAX_NAME_BYTES = 255  # NAME_MAX, per path component
MAX_XATTR_NAME_BYTES = 255  # XATTR_NAME_MAX
MAX_XATTR_VALUE_BYTES = 65536  # XATTR_SIZE_MAX
MAX_XATTR_LIST_BYTES = 65536  # XATTR_LIST_MAX: all of a file's names, each with its NUL
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]+")
_POSITION_NUMBER = re.compile(r"[0-9]{1,19}")
# JSON nodes per entry: an upstream or lazyfs entry has at most about 25 fields; the bound keeps
# what json.loads can build from a hostile TOC near what honest entries of that count take.
_VALUES_PER_ENTRY = 16
_CONTAINERS_PER_ENTRY = 2  # the entry object and its xattrs object
_DEFAULT_LIMITS = LimitsConfig()
# Bump when a check of Toc.parse changes: TOCs kept as checked by older rules
# (lazyfs/mount/kepttocs.py) are then parsed and checked again.
CHECKS_VERSION = 1


@dataclass(frozen=True)
class TocEntry:
    """One TOC entry. Field order is the Go struct's, which fixes the JSON key order."""

    type: str
    name: str
    link_name: str = ""
    mode: int = 0
    size: int = 0
    uid: int = 0
    gid: int = 0
    modtime: str = ""  # RFC 3339 with nanoseconds, UTC; "" when unknown
    accesstime: str = ""
    changetime: str = ""
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    digest: str = ""  # sha256 of the whole file; "" for empty files
    offset: int = 0  # compressed byte range of this file's (or chunk's) frames in the blob
    end_offset: int = 0
    chunk_size: int = 0
    chunk_offset: int = 0
    chunk_digest: str = ""
    chunk_type: str = ""  # "" for data, "zeros" for a run of zeros
    inner_offset: int = 0  # eStargz: where the chunk starts in its decompressed gzip member(s)
    verity: str = ""  # lazyfs: fs-verity digest of the whole file
    chunk_verity: str = ""  # lazyfs: fs-verity digest of this chunk's uncompressed bytes
    prefetch: int = (
        0  # lazyfs: 1-based rank in the prefetch order (lazyfs/mount/prefetch.py); 0: none
    )


# (attribute, JSON key, kind) in Go struct order.
_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("type", "type", "str!"),
    ("name", "name", "str!"),
    ("link_name", "linkName", "str"),
    ("mode", "mode", "int"),
    ("size", "size", "int"),
    ("uid", "uid", "int"),
    ("gid", "gid", "int"),
    ("modtime", "modtime", "str"),
    ("accesstime", "accesstime", "str"),
    ("changetime", "changetime", "str"),
    ("dev_major", "devMajor", "int"),
    ("dev_minor", "devMinor", "int"),
    ("xattrs", "xattrs", "xattrs"),
    ("digest", "digest", "str"),
    ("offset", "offset", "int"),
    ("end_offset", "endOffset", "int"),
    ("chunk_size", "chunkSize", "int"),
    ("chunk_offset", "chunkOffset", "int"),
    ("chunk_digest", "chunkDigest", "str"),
    ("chunk_type", "chunkType", "str"),
    ("inner_offset", "innerOffset", "int"),
    ("verity", "lazyfsVerity", "str"),
    ("chunk_verity", "lazyfsChunkVerity", "str"),
    ("prefetch", "lazyfsPrefetch", "int"),
)


@dataclass(frozen=True)
class Toc:
    """A parsed TOC."""

    entries: tuple[TocEntry, ...]
    tar_split_digest: str = ""
    version: int = 1

    def to_json(self) -> bytes:
        return b"".join(self._json_pieces())

    def _json_pieces(self) -> Iterator[bytes]:
        yield b'{"version":%d,"entries":[' % self.version
        for index, entry in enumerate(self.entries):
            if index:
                yield b","
            yield _go_json(_entry_to_obj(entry))
        yield b"]"
        if self.tar_split_digest:
            yield b',"tarSplitDigest":' + _go_json(self.tar_split_digest)
        yield b"}"

    @classmethod
    def parse(
        cls,
        data: bytes,
        *,
        layer: str = "",
        blob_size: int | None = None,
        limits: LimitsConfig = _DEFAULT_LIMITS,
        check_chunks: bool = True,
    ) -> Toc:
        """Parse and check a TOC; TocError (one line) for anything out of range.

        ``layer`` names the layer in messages (its digest). ``blob_size`` is the blob's size,
        or where its payload ends (the TOC's offset), when known: chunk ranges must lie within.
        ``check_chunks=False`` checks fields only, for formats whose entries describe chunks
        differently (eStargz checks them once converted, with :func:`file_problem`).
        """
        where = _prefix(layer)
        obj = _load_toc_json(data, where, limits)
        raw_entries = obj.get("entries")
        if not isinstance(raw_entries, list):
            raise TocError(f"{where}TOC has no entries list")
        version = obj.get("version")
        if type(version) is not int or version != 1:
            raise TocError(f"{where}unsupported TOC version {_shown(version)}")
        if len(raw_entries) > limits.max_toc_entries:
            raise TocError(
                f"{where}TOC has {len(raw_entries)} entries, more than the limit of "
                f"{limits.max_toc_entries}"
            )
        entries = tuple(_entry_from_obj(raw, index, where) for index, raw in enumerate(raw_entries))
        tar_split_digest = _expect(obj, "tarSplitDigest", str, "", where)
        if tar_split_digest and not _DIGEST_RE.fullmatch(tar_split_digest):
            raise TocError(f"{where}TOC tarSplitDigest {_shown(tar_split_digest)} is no sha256")
        if check_chunks:
            _check_files(entries, where, blob_size, limits)
        return cls(entries, tar_split_digest, 1)


def _entry_to_obj(entry: TocEntry) -> dict[str, Any]:
    values = vars(entry)
    if values["xattrs"]:
        return _entry_with_xattrs_to_obj(entry)
    # Without xattrs, the keys in order are type, name, then the plain fields that are set:
    # a third of the time of the loop below (a layer's TOC has 10^4 entries).
    obj: dict[str, Any] = {"type": values["type"], "name": values["name"]}
    for attr, key in _PLAIN_FIELDS:
        if value := values[attr]:
            obj[key] = value
    return obj


def _entry_with_xattrs_to_obj(entry: TocEntry) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for attr, key, kind in _FIELDS:
        value = getattr(entry, attr)
        if kind == "xattrs":
            if value:
                obj[key] = {k: base64.b64encode(v).decode() for k, v in sorted(value.items())}
        elif value or kind == "str!":
            obj[key] = value
    return obj


_JSON_TYPE = {"int": int, "str": str, "str!": str}
# (attribute, JSON key) of the fields written only when set, in order; type and name (always
# written) come first in _FIELDS, so an entry without xattrs is written in this order.
_PLAIN_FIELDS = tuple((attr, key) for attr, key, kind in _FIELDS if kind in ("int", "str"))


def _entry_from_obj(raw: object, index: int, where: str) -> TocEntry:
    """One entry, every field checked as it is read; only the keys present are looked at
    (mounts parse hundreds of thousands, so numbers are checked inline)."""
    if not isinstance(raw, dict):
        raise TocError(f"{where}TOC entry {index} is not an object")
    values = _ENTRY_DEFAULTS.copy()
    try:
        for key, value in raw.items():
            spec = _PARSE_SPECS.get(key)
            if spec is None or value is None:
                continue  # unknown fields are ignored, as Go's encoding/json does
            attr, json_type, largest, pattern, check = spec
            if type(value) is not json_type:  # exact: a JSON true is no int
                if json_type is not dict:
                    raise _Problem(f"{key} is {_json_type(value)}, not {json_type.__name__}")
                _decode_xattrs(value)  # raises: what is wrong
            if largest:
                if not 0 <= value <= largest:
                    raise _Problem(f"{key} {_shown(value)} out of range 0..{largest}")
            elif pattern is not None:
                if not pattern.fullmatch(value):
                    raise _Problem(f"{key} {_shown(value)} is not sha256:<64 hex digits>")
            elif check is not None:
                if json_type is dict:
                    value = _decode_xattrs(value)
                check(value)
            values[attr] = value
        if values["xattrs"] is None:
            values["xattrs"] = {}
        entry = _new_entry(values)
        _check_entry_shape(entry)
    except _Problem as exc:
        raise TocError(f"{_entry_where(where, index, raw.get('name'))}{exc}") from None
    return entry


def _new_entry(values: dict[str, Any]) -> TocEntry:
    """A TocEntry of ``values`` (every field, by attribute), without the dataclass's
    ``__init__``: a frozen dataclass sets each of its 24 fields through ``object.__setattr__``,
    which took a third of parsing a TOC. Equality, hashing and ``replace`` read the attributes,
    so the entry is the one ``TocEntry(**values)`` makes."""
    entry = _NEW(TocEntry)
    _SET(entry, "__dict__", values)
    return entry


def trusted_entry(values: dict[str, Any]) -> TocEntry:
    """``TocEntry(**values)`` for values a writer made (attributes of TocEntry, each of its
    type; not checked), a quarter of the time: a converted layer makes 10^4 entries."""
    merged = _ENTRY_DEFAULTS | values
    if merged["xattrs"] is None:
        merged["xattrs"] = {}
    return _new_entry(merged)


_NEW = object.__new__
_SET = object.__setattr__
# Every field at its default, type and name "" (a missing one is refused with the entry's
# shape); xattrs None, for a new dict per entry.
_ENTRY_DEFAULTS: dict[str, Any] = {
    f.name: "" if f.default is MISSING else f.default for f in fields(TocEntry)
} | {"xattrs": None}


def _expect(obj: Mapping[str, object], key: str, kind: type, default: Any, where: str) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TocError(f"{where}TOC field {key!r} is {_json_type(value)}, not {kind.__name__}")
    return value


def _decode_xattrs(raw: object) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise _Problem(f"xattrs is {_json_type(raw)}, not an object")
    decoded: dict[str, bytes] = {}
    for name, value in raw.items():
        if not isinstance(value, str):
            raise _Problem(f"xattr {_shown(name)} is {_json_type(value)}, not base64 text")
        try:
            decoded[name] = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise _Problem(f"xattr {_shown(name)} is not valid base64") from None
    return decoded


# --- loading the JSON within bounds ---------------------------------------------------------------


def _load_toc_json(data: bytes, where: str, limits: LimitsConfig) -> dict[str, Any]:
    """The TOC's top-level object, parsed only once its size and shape are within ``limits``."""
    if len(data) > limits.max_toc_bytes:
        raise TocError(
            f"{where}TOC is {len(data)} bytes, more than the limit of {limits.max_toc_bytes}"
        )
    _check_json_shape(data, where, limits)
    try:
        text = data.decode("utf-8")  # Go writes UTF-8 only; no BOM, no UTF-16
        obj = json.loads(
            text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise TocError(f"{where}TOC is not valid JSON: {_one_line(str(exc))}") from exc
    if not isinstance(obj, dict):
        raise TocError(f"{where}TOC is {_json_type(obj)}, not an object")
    return obj


def _check_json_shape(data: bytes, where: str, limits: LimitsConfig) -> None:
    """Refuse JSON that would build far more objects than ``max_toc_entries`` entries need.

    json.loads builds everything before any count can be checked, and small nodes cost much
    more than their text (``{},`` is 3 bytes and an 88-byte dict). Counting brackets and commas
    (an upper bound on objects, arrays and values: brackets and commas inside strings only
    over-count) bounds that memory at C speed, before parsing.
    """
    containers = data.count(b"{") + data.count(b"[")
    max_containers = _CONTAINERS_PER_ENTRY * limits.max_toc_entries + 16
    if containers > max_containers:
        raise TocError(
            f"{where}TOC has {containers} JSON objects and arrays, more than "
            f"{limits.max_toc_entries} entries may hold"
        )
    values = data.count(b",")
    if values > _VALUES_PER_ENTRY * limits.max_toc_entries + 4096:
        raise TocError(
            f"{where}TOC has {values} JSON values, more than {limits.max_toc_entries} entries "
            f"may hold"
        )


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Parsers disagree on which duplicate wins, so such a TOC means two things.
        raise ValueError(f"duplicate key {_first_duplicate(pairs)!r} in an object")
    return result


def _first_duplicate(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no duplicate")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN and Infinity; Go does not


# --- checking the entries -------------------------------------------------------------------------


class _Problem(Exception):
    """Internal: what is wrong with one entry; the caller says which entry."""


def check_entries(
    entries: Sequence[TocEntry],
    *,
    layer: str = "",
    blob_size: int | None = None,
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> None:
    """Check every entry of a zstd:chunked TOC against its real range, and each regular file's
    chunks against its size, ``blob_size`` and ``limits``; TocError (one line) otherwise.

    :meth:`Toc.parse` runs it; run it on TOCs built some other way (a local conversion) before
    mounting them.
    """
    where = _prefix(layer)
    if len(entries) > limits.max_toc_entries:
        raise TocError(
            f"{where}TOC has {len(entries)} entries, more than the limit of "
            f"{limits.max_toc_entries}"
        )
    _check_each_entry(entries, where)
    _check_files(entries, where, blob_size, limits)


def _check_files(
    entries: Sequence[TocEntry], where: str, blob_size: int | None, limits: LimitsConfig
) -> None:
    for index, group in _indexed_groups(entries, where):
        problem = file_problem(group, blob_size, limits)
        if problem is not None:
            raise TocError(f"{_entry_where(where, index, group[0].name)}{problem}")


def _check_each_entry(entries: Iterable[TocEntry], where: str) -> None:
    for index, entry in enumerate(entries):
        try:
            _check_fields(entry)
        except _Problem as exc:
            raise TocError(f"{_entry_where(where, index, entry.name)}{exc}") from None


def _check_fields(entry: TocEntry) -> None:
    """The checks :func:`_entry_from_obj` makes as it reads JSON, on a built entry."""
    for attr, key, _ in _FIELDS:
        value = getattr(entry, attr)
        if value or key in ("type", "name"):
            _FIELD_CHECKS[key](value)
    _check_entry_shape(entry)


def _check_entry_shape(entry: TocEntry) -> None:
    """What concerns several fields: a link has a target; only a directory is the root."""
    _check_type(entry.type)  # also when the key is missing
    if entry.type in ("symlink", "hardlink") and not entry.link_name:
        raise _Problem(f"a {entry.type} needs a linkName")
    if entry.type != "dir" and entry.type != "chunk" and _names_root(entry.name):
        raise _Problem(f"a {entry.type} cannot be the root directory")


def _names_root(name: str) -> bool:
    """True if the merged tree resolves ``name`` to the root (``..`` stops at the root)."""
    if ".." not in name:
        return not name.strip("/.")  # only "/" and "." components (".x" is a name)
    return posixpath.normpath("/" + name) == "/"


def _range_check(key: str, largest: int) -> Callable[[Any], None]:
    def check(value: int) -> None:
        if not 0 <= value <= largest:
            raise _Problem(f"{key} {_shown(value)} out of range 0..{largest}")

    return check


def _check_mode(mode: int) -> None:
    if not 0 <= mode <= MAX_MODE or stat.S_IFMT(mode) not in _MODE_TYPE_BITS:
        raise _Problem(f"mode {mode:#o} is not permission bits (0..0o7777) and a file type")


def _check_type(kind: str) -> None:
    if kind not in ENTRY_TYPES:
        raise _Problem(f"unknown type {_shown(kind)}")


def _path_check(key: str) -> Callable[[Any], None]:
    def check(text: str) -> None:
        """NUL-free and within PATH_MAX and NAME_MAX, counted in the bytes the kernel sees."""
        if "\x00" in text:
            raise _Problem(f"{key} holds a NUL byte")
        size = len(text) if text.isascii() else len(name_bytes(text))
        if size > MAX_PATH_BYTES:
            raise _Problem(f"{key} is {size} bytes, more than PATH_MAX allows ({MAX_PATH_BYTES})")
        if size > MAX_NAME_BYTES:
            longest = max(len(name_bytes(part)) for part in text.split("/"))
            if longest > MAX_NAME_BYTES:
                raise _Problem(f"{key} has a {longest}-byte component, more than NAME_MAX (255)")

    return check


def _time_check(key: str) -> Callable[[Any], None]:
    def check(text: str) -> None:
        try:
            parse_rfc3339_ns(text)
        except TocError:
            raise _Problem(f"{key} {_shown(text)} is not an RFC 3339 time") from None

    return check


def _digest_check(key: str) -> Callable[[Any], None]:
    def check(digest: str) -> None:
        if digest and not _DIGEST_RE.fullmatch(digest):
            raise _Problem(f"{key} {_shown(digest)} is not sha256:<64 hex digits>")

    return check


def _check_chunk_type(chunk_type: str) -> None:
    if chunk_type not in CHUNK_TYPES:
        raise _Problem(f"unknown chunkType {_shown(chunk_type)}")


def name_bytes(text: str) -> bytes:
    """TOC text as the bytes the kernel sees, as the merged tree encodes it: tar's non-UTF-8
    bytes (surrogate escapes) come back as they were; a lone surrogate from a JSON escape is
    kept as its 3-byte form."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _check_xattrs(xattrs: Mapping[str, bytes]) -> None:
    listed = 0
    for name, value in xattrs.items():
        encoded = name_bytes(name)
        if not encoded or b"\x00" in encoded or len(encoded) > MAX_XATTR_NAME_BYTES:
            raise _Problem(f"xattr name {_shown(name)} is empty, holds NUL or exceeds 255 bytes")
        if len(value) > MAX_XATTR_VALUE_BYTES:
            raise _Problem(
                f"xattr {_shown(name)} is {len(value)} bytes, more than {MAX_XATTR_VALUE_BYTES}"
            )
        listed += len(encoded) + 1
    if listed > MAX_XATTR_LIST_BYTES:
        raise _Problem(f"xattr names take {listed} bytes, more than {MAX_XATTR_LIST_BYTES}")


# The largest value of each number with a plain range; every one of them starts at 0.
_NUMBER_RANGES: dict[str, int] = {
    "size": MAX_INT64,
    "uid": MAX_ID,
    "gid": MAX_ID,
    "devMajor": MAX_DEV_MAJOR,
    "devMinor": MAX_DEV_MINOR,
    "offset": MAX_INT64,
    "endOffset": MAX_INT64,
    "chunkSize": MAX_INT64,
    "chunkOffset": MAX_INT64,
    "innerOffset": MAX_INT64,
    "lazyfsPrefetch": MAX_INT64,
}

# The check of each field, by JSON key.
_FIELD_CHECKS: dict[str, Callable[[Any], None]] = {
    "type": _check_type,
    "name": _path_check("name"),
    "linkName": _path_check("linkName"),
    "mode": _check_mode,
    **{key: _range_check(key, largest) for key, largest in _NUMBER_RANGES.items()},
    "modtime": _time_check("modtime"),
    "accesstime": _time_check("accesstime"),
    "changetime": _time_check("changetime"),
    "xattrs": _check_xattrs,
    "digest": _digest_check("digest"),
    "chunkDigest": _digest_check("chunkDigest"),
    "chunkType": _check_chunk_type,
    "lazyfsVerity": _digest_check("lazyfsVerity"),
    "lazyfsChunkVerity": _digest_check("lazyfsChunkVerity"),
}
assert set(_FIELD_CHECKS) == {key for _, key, _ in _FIELDS}

# Per JSON key, for parsing, the checks inlined where they are cheap: (attribute, JSON type,
# largest value of a plain range or 0, the pattern of a digest or None, the check of anything
# else or None). The entry's type is checked with its shape, once it is built.
_DIGEST_KEYS = frozenset({"digest", "chunkDigest", "lazyfsVerity", "lazyfsChunkVerity"})
_OPTIONAL_DIGEST_RE = re.compile(rf"(?:{_DIGEST_RE.pattern})?")
_PARSE_SPECS: dict[str, tuple[str, type, int, re.Pattern[str] | None, Callable[[Any], None] | None]]
_PARSE_SPECS = {
    key: (
        attr,
        dict if kind == "xattrs" else _JSON_TYPE[kind],
        _NUMBER_RANGES.get(key, 0),
        _OPTIONAL_DIGEST_RE if key in _DIGEST_KEYS else None,
        None if key in _NUMBER_RANGES.keys() | _DIGEST_KEYS | {"type"} else _FIELD_CHECKS[key],
    )
    for attr, key, kind in _FIELDS
}


def _indexed_groups(
    entries: Sequence[TocEntry], where: str
) -> Iterator[tuple[int, list[TocEntry]]]:
    """Like :func:`group_file_entries`, with the index of each group's first entry."""
    start = 0
    for index, entry in enumerate(entries):
        if entry.type != "chunk":
            if index > start:
                yield start, list(entries[start:index])
            start = index
        elif entries[start].type != "reg" or entries[start].name != entry.name:
            problem = "chunk entry does not follow its file's reg entry"
            raise TocError(f"{_entry_where(where, index, entry.name)}{problem}")
    if len(entries) > start:
        yield start, list(entries[start:])


def file_problem(
    group: Sequence[TocEntry], blob_size: int | None, limits: LimitsConfig = _DEFAULT_LIMITS
) -> str | None:
    """What is wrong with one entry and the chunk entries after it, or None: a regular file's
    chunks must tile it, lie within ``blob_size`` and keep within ``limits``."""
    head = group[0]
    if head.type != "reg":
        return None
    if head.size == 0:
        return "an empty file has chunk entries" if len(group) > 1 else None
    try:
        if len(group) == 1:  # most files: one chunk, checked without building it
            _check_range(0, head.size, head.offset, head.end_offset, False, 0)
            _check_within(0, head.size, head.offset, head.end_offset, False, head.inner_offset,
                          blob_size, limits)  # fmt: skip
            return None
        for chunk in _chunk_refs(list(group)):
            _check_within(chunk.file_offset, chunk.size, chunk.blob_offset, chunk.blob_end,
                          chunk.zeros, chunk.inner_offset, blob_size, limits)  # fmt: skip
    except _Problem as exc:
        return str(exc)
    return None


def _check_within(
    file_offset: int,
    size: int,
    blob_offset: int,
    blob_end: int,
    zeros: bool,
    inner_offset: int,
    blob_size: int | None,
    limits: LimitsConfig,
) -> None:
    """One chunk's range within the blob, and its sizes within ``limits``."""
    at = f"chunk at {file_offset}"
    if blob_size is not None and blob_end > blob_size:
        raise _Problem(f"{at} ends at byte {blob_end}, past the blob's {blob_size}")
    if zeros:
        return  # never fetched or decompressed
    if inner_offset + size > limits.max_chunk_bytes:
        raise _Problem(
            f"{at} is {inner_offset + size} bytes uncompressed, more than the limit of "
            f"{limits.max_chunk_bytes}"
        )
    if blob_end - blob_offset > 2 * limits.max_chunk_bytes:
        raise _Problem(
            f"{at} takes {blob_end - blob_offset} compressed bytes, more than twice the limit "
            f"of {limits.max_chunk_bytes}"
        )


# --- timestamps -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # the files of an image share few distinct mtimes
def parse_rfc3339_ns(text: str) -> int:
    """``2023-01-02T03:04:05.123Z`` (or with an offset) -> nanoseconds since the epoch.

    The same rules as the merged tree's (lazyfs/mount/tree.py), so a time this accepts is one
    the tree accepts: years 1 to 9999 (datetime's range), a fraction of ASCII digits.
    """
    if not text:
        return 0
    main, fraction, zone = _split_timestamp(text)
    try:
        seconds = int(datetime.fromisoformat(main + zone).timestamp())
    except (ValueError, OverflowError) as exc:
        raise TocError(f"invalid timestamp {_shown(text)}") from exc
    if fraction and not _DIGITS.fullmatch(fraction):
        raise TocError(f"invalid timestamp {_shown(text)}")
    return seconds * 1_000_000_000 + int((fraction + "000000000")[:9])


def _split_timestamp(text: str) -> tuple[str, str, str]:
    zone = "+00:00"
    body = text
    if body.endswith(("Z", "z")):
        body = body[:-1]
    elif len(body) > 6 and body[-6] in "+-" and body[-3] == ":":
        body, zone = body[:-6], body[-6:]
    main, _, fraction = body.partition(".")
    return main, fraction, zone


# --- one-line messages ----------------------------------------------------------------------------

_SHOWN_CHARS = 80


def _prefix(layer: str) -> str:
    return f"layer {layer}: " if layer else ""


def _entry_where(where: str, index: int, name: object) -> str:
    shown = _shown_name(name) if isinstance(name, str) else "?"
    return f"{where}TOC entry {index} ({shown}): "


def _shown_name(name: str) -> str:
    """A name as it may appear in a one-line message: plain if printable, else its repr."""
    text = name if name.isprintable() and name.strip() == name and name else repr(name)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names |= {list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def entries_json(entries: Sequence[TocEntry]) -> bytes:
    """``entries`` as ``Toc.to_json`` writes them, comma-separated, for a writer that encodes
    entries as it makes them (one ``json.dumps`` for many: the same bytes, less work)."""
    return _go_json([_entry_to_obj(entry) for entry in entries])[1:-1]


def toc_json(toc: Toc, encoded_entries: Iterable[bytes]) -> bytes:
    """``toc.to_json()``, given its entries already encoded by :func:`entries_json`."""
    parts = [part for part in encoded_entries if part]
    digest = b',"tarSplitDigest":' + _go_json(toc.tar_split_digest) if toc.tar_split_digest else b""
    return b'{"version":%d,"entries":[%s]%s}' % (toc.version, b",".join(parts), digest)


def _go_json(value: object) -> bytes:
    """Encode like Go's encoding/json: compact, sorted map keys, UTF-8, HTML-safe."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    if text.isascii():  # no line separators, no surrogates: skip the scans (~40 % of the time)
        return text.encode("ascii")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    # Go writes invalid UTF-8 (here: surrogates) as U+FFFD.
    return _SURROGATE.sub("\ufffd", text).encode("utf-8")


@dataclass(frozen=True)
class BlobSection:
    """Where a compressed section (TOC or tar-split) sits in the layer blob."""

    offset: int
    length: int
    uncompressed_length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def parse_toc_position(
    value: str,
    *,
    layer: str = "",
    blob_size: int | None = None,
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> BlobSection:
    """Parse ``offset:length:uncompressedLength:1`` from the manifest-position annotation.

    The section must lie within ``blob_size`` (the layer descriptor's size) when it is given,
    and its lengths within ``limits``: it says how much to fetch and to decompress.
    """
    where = f"{_prefix(layer)}TOC position annotation {_shown(value)}"
    numbers = _position_numbers(value, 4, where)
    if numbers[3] != MANIFEST_TYPE_CRFS:
        raise TocError(f"{where}: unsupported manifest type {numbers[3]}")
    section = BlobSection(numbers[0], numbers[1], numbers[2])
    _check_section(section, where, blob_size, limits.max_toc_compressed_bytes, limits.max_toc_bytes)
    return section


def parse_tarsplit_position(
    value: str,
    *,
    layer: str = "",
    blob_size: int | None = None,
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> BlobSection:
    """Parse ``offset:length:uncompressedLength`` from the tarsplit-position annotation."""
    where = f"{_prefix(layer)}tar-split position annotation {_shown(value)}"
    numbers = _position_numbers(value, 3, where)
    section = BlobSection(numbers[0], numbers[1], numbers[2])
    limit = limits.max_tar_split_bytes
    _check_section(section, where, blob_size, limit, limit)
    return section


def _position_numbers(value: str, count: int, where: str) -> list[int]:
    """``count`` decimal numbers separated by colons; ASCII digits only (``int()`` would also
    take signs, spaces, underscores and other scripts' digits)."""
    parts = value.split(":")
    if len(parts) != count or not all(_POSITION_NUMBER.fullmatch(part) for part in parts):
        raise TocError(f"{where}: expected {count} decimal numbers separated by ':'")
    numbers = [int(part) for part in parts]
    if max(numbers) > MAX_INT64:
        raise TocError(f"{where}: a number is out of range 0..{MAX_INT64}")
    return numbers


def _check_section(
    section: BlobSection,
    where: str,
    blob_size: int | None,
    max_compressed_bytes: int,
    max_uncompressed_bytes: int,
) -> None:
    if section.length == 0:
        raise TocError(f"{where}: the section is empty")
    if blob_size is not None and section.end > blob_size:
        raise TocError(f"{where}: the section ends past the {blob_size}-byte blob")
    if section.length > max_compressed_bytes:
        raise TocError(
            f"{where}: {section.length} bytes, more than the limit of {max_compressed_bytes}"
        )
    if section.uncompressed_length > max_uncompressed_bytes:
        raise TocError(
            f"{where}: {section.uncompressed_length} bytes uncompressed, more than the limit "
            f"of {max_uncompressed_bytes}"
        )


def format_toc_position(section: BlobSection) -> str:
    return f"{section.offset}:{section.length}:{section.uncompressed_length}:{MANIFEST_TYPE_CRFS}"


def format_tarsplit_position(section: BlobSection) -> str:
    return f"{section.offset}:{section.length}:{section.uncompressed_length}"


def skippable_frame(data: bytes) -> bytes:
    """Wrap ``data`` in a zstd skippable frame, which decoders pass over."""
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class Footer:
    """The 64-byte zstd:chunked footer (the payload of the last skippable frame)."""

    toc: BlobSection
    tar_split: BlobSection

    def to_bytes(self) -> bytes:
        return (
            struct.pack(
                "<7Q",
                self.toc.offset,
                self.toc.length,
                self.toc.uncompressed_length,
                MANIFEST_TYPE_CRFS,
                self.tar_split.offset,
                self.tar_split.length,
                self.tar_split.uncompressed_length,
            )
            + FOOTER_MAGIC
        )

    @classmethod
    def parse(cls, data: bytes) -> Footer:
        """Parse a 64-byte footer, or the 40-byte legacy one (which has no tar-split)."""
        if len(data) == FOOTER_BYTES and data.endswith(FOOTER_MAGIC):
            values = struct.unpack("<7Q", data[:56])
            if values[3] != MANIFEST_TYPE_CRFS:
                raise TocError(f"unsupported zstd:chunked manifest type {values[3]}")
            return cls(BlobSection(*values[0:3]), BlobSection(*values[4:7]))
        if len(data) == LEGACY_FOOTER_BYTES and data.endswith(LEGACY_FOOTER_MAGIC):
            values = struct.unpack("<4Q", data[:32])
            if values[3] != MANIFEST_TYPE_CRFS:
                raise TocError(f"unsupported zstd:chunked manifest type {values[3]}")
            return cls(BlobSection(*values[0:3]), BlobSection(0, 0, 0))
        raise TocError("no zstd:chunked footer at the end of the layer")


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a regular file: where its bytes are, compressed and uncompressed."""

    file_offset: int  # offset of the chunk inside the file
    size: int  # uncompressed size
    blob_offset: int  # compressed byte range [blob_offset, blob_end) in the layer blob
    blob_end: int
    sha256: str  # "sha256:<hex>" of the uncompressed chunk ("" if unknown)
    verity: str  # fs-verity digest of the uncompressed chunk ("" if not a lazyfs layer)
    zeros: bool = False
    inner_offset: int = 0  # eStargz: bytes to skip in the decompressed range before the chunk
    prefetch: int = 0  # rank in the prefetch order, 1-based; 0: not prefetched


def file_chunks(entries: tuple[TocEntry, ...] | list[TocEntry]) -> list[ChunkRef]:
    """Chunks of one regular file, from its ``reg`` entry followed by its ``chunk`` entries."""
    try:
        return _chunk_refs(entries)
    except _Problem as exc:
        raise TocError(f"TOC entry {_shown(entries[0].name)}: {exc}") from None


def _chunk_refs(entries: tuple[TocEntry, ...] | list[TocEntry]) -> list[ChunkRef]:
    head = entries[0]
    if head.size < 0:
        raise _Problem("negative size")
    if head.size == 0:
        return []
    if len(entries) == 1:
        sha = head.chunk_digest or head.digest
        verity = head.chunk_verity or head.verity
        single = _chunk_ref(
            0,
            head.size,
            head.offset,
            head.end_offset,
            sha,
            verity,
            False,
            head.inner_offset,
            head.prefetch,
        )
        _check_chunks_cover(head, [single])
        return [single]
    chunks = []
    ends = _chunk_ends(entries, head.end_offset)
    for index, entry in enumerate(entries):
        end = ends[index]
        size = entry.chunk_size or _implied_chunk_size(entries, index, head.size)
        chunks.append(
            _chunk_ref(
                entry.chunk_offset,
                size,
                entry.offset,
                end,
                entry.chunk_digest,
                entry.chunk_verity,
                entry.chunk_type == "zeros",
                entry.inner_offset,
                entry.prefetch,
            )
        )
    _check_chunks_cover(head, chunks)
    return chunks


def _chunk_ref(
    file_offset: int,
    size: int,
    blob_offset: int,
    blob_end: int,
    sha256: str,
    verity: str,
    zeros: bool,
    inner_offset: int,
    prefetch: int,
) -> ChunkRef:
    """``ChunkRef(...)`` without the frozen dataclass's ``__init__`` (as ``_new_entry``): a
    mount makes one per chunk of the image, a fifth of building its tree."""
    ref = _NEW(ChunkRef)
    _SET(ref, "__dict__", {
        "file_offset": file_offset, "size": size, "blob_offset": blob_offset,
        "blob_end": blob_end, "sha256": sha256, "verity": verity, "zeros": zeros,
        "inner_offset": inner_offset, "prefetch": prefetch,
    })  # fmt: skip
    return ref


# The same for a writer, which makes one per chunk too.
chunk_ref = _chunk_ref


def _chunk_ends(entries: tuple[TocEntry, ...] | list[TocEntry], file_end: int) -> list[int]:
    """Where each chunk's compressed bytes end: where the next chunk's start, unless that chunk
    shares the same (eStargz) gzip member, which an ``innerOffset`` says; then where that one's
    end. One pass from the last chunk back, so a file of many chunks costs linear time."""
    ends = [file_end] * len(entries)
    for i in range(len(entries) - 2, -1, -1):
        following = entries[i + 1]
        shares_member = following.offset == entries[i].offset and following.inner_offset != 0
        ends[i] = ends[i + 1] if shares_member else following.offset
    return ends


def _implied_chunk_size(entries: tuple[TocEntry, ...] | list[TocEntry], i: int, size: int) -> int:
    following = entries[i + 1].chunk_offset if i + 1 < len(entries) else size
    return following - entries[i].chunk_offset


def _check_chunks_cover(head: TocEntry, chunks: list[ChunkRef]) -> None:
    position = 0
    for chunk in chunks:
        _check_range(
            position,
            chunk.size,
            chunk.blob_offset,
            chunk.blob_end,
            chunk.zeros,
            chunk.file_offset,
        )
        position += chunk.size
    if position != head.size:
        raise _Problem(f"chunks cover {position} of {head.size} bytes")


def _check_range(
    position: int, size: int, blob_offset: int, blob_end: int, zeros: bool, file_offset: int
) -> None:
    """A chunk that starts where the one before ended, and has bytes in the blob."""
    if file_offset != position or size <= 0:
        raise _Problem(f"chunks do not tile the file (chunk at {file_offset})")
    if blob_end < blob_offset or (not zeros and blob_end == blob_offset):
        raise _Problem(
            f"chunk at {file_offset} has an empty byte range [{blob_offset}, {blob_end})"
        )


def group_file_entries(entries: tuple[TocEntry, ...]) -> Iterator[list[TocEntry]]:
    """Yield each non-chunk entry with the chunk entries that follow it."""
    group: list[TocEntry] = []
    for entry in entries:
        if entry.type == "chunk":
            if not group or group[0].type != "reg" or group[0].name != entry.name:
                raise TocError(f"TOC chunk entry {entry.name!r} does not follow its file")
            group.append(entry)
            continue
        if group:
            yield group
        group = [entry]
    if group:
        yield group


def with_chunk_fields(entry: TocEntry, chunk: ChunkRef, chunk_type: str) -> TocEntry:
    """Copy ``entry`` with the chunk* fields of ``chunk`` set."""
    return replace(
        entry,
        offset=chunk.blob_offset,
        chunk_size=chunk.size,
        chunk_offset=chunk.file_offset,
        chunk_digest=chunk.sha256,
        chunk_type=chunk_type,
        chunk_verity=chunk.verity,
    )
