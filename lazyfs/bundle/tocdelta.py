"""TOC deltas: a zstd:chunked TOC carried as a zstd delta against a TOC the target holds.

A bundle of v2 for a node that has v1 carries only the chunks that changed, but v2's whole
TOC (a mount needs it), about a third of such a bundle. v1's TOC, which the node holds (its
inventory lists it), is most of v2's: compressed with v1's JSON as a raw-content dictionary
(``zstd --patch-from``'s method: a window that spans both, long-distance matching), v2's JSON
takes a few percent of its size.

The node must end up with the TOC's exact bytes, which its digest (the manifest's checksum
annotation) names, and those are a zstd frame of the JSON. So a delta is only made when
recompressing the JSON at a known level gives those bytes back (lazyfs convert's TOCs:
``ZstdCompressor(level).compress``), and only for a target whose zstd library is the
exporter's own (the inventory says which), since another version may compress differently.
The importer rebuilds the JSON (bounded by the size the delta record declares), recompresses
it, and checks the result against the digest before admitting anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import zstandard

from lazyfs.config import LimitsConfig
from lazyfs.errors import BundleError, LazyfsError
from lazyfs.formats.bounded import zstd_bounded
from lazyfs.model.digest import Digest

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DELTA_LEVEL = 19
LEVELS = (3,)  # recompression levels tried: lazyfs convert's default (config.ConvertConfig)
MAX_TOC_JSON_BYTES = LimitsConfig().max_toc_bytes
_MIN_WINDOW_LOG = 20
_MAX_WINDOW_LOG = 30  # 1 GiB: twice the largest TOC JSON a mount accepts, and then some
_CHUNK_DIGEST = re.compile(rb'"(?:chunkDigest|digest)":"(sha256:[0-9a-f]{64})"')


def zstd_library() -> str:
    """What the inventory records of this node's compressor: deltas need the same on both."""
    return "zstd " + ".".join(str(part) for part in zstandard.ZSTD_VERSION)


@dataclass(frozen=True)
class TocDelta:
    key: str  # the TOC's cache key: blob:sha256 of its compressed bytes
    base: str  # the cache key of the TOC the target holds, the dictionary
    blob: Digest  # the bundle blob holding the delta
    size: int  # the TOC's JSON, decompressed
    level: int  # zstd level that recompresses the JSON into the TOC's bytes

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "base": self.base,
            "blob": str(self.blob),
            "size": self.size,
            "level": self.level,
        }


def toc_json(value: bytes, what: str) -> bytes:
    """A zstd:chunked TOC's JSON, decompressed (bounded)."""
    try:
        return zstd_bounded(value, MAX_TOC_JSON_BYTES, what)
    except LazyfsError as exc:
        raise BundleError(str(exc)) from exc


def digests_in(json_bytes: bytes) -> set[bytes]:
    """The chunk and file digests a TOC names: how alike two TOCs are, cheaply."""
    return set(_CHUNK_DIGEST.findall(json_bytes))


def pick_base(target_json: bytes, candidates: dict[str, bytes]) -> str | None:
    """The candidate TOC (key: JSON) that names the most of the target's digests."""
    wanted = digests_in(target_json)
    scored = [(len(wanted & digests_in(json_bytes)), key) for key, json_bytes in candidates.items()]
    best = max(scored, default=(0, ""))
    return best[1] if best[0] > 0 else None


def encode(value: bytes, target_json: bytes, base_json: bytes) -> tuple[bytes, int] | None:
    """(delta, level), or None if recompression does not give ``value`` back."""
    level = next((n for n in LEVELS if _compress(target_json, n) == value), None)
    if level is None:
        return None
    return _delta_compressor(base_json, len(target_json)).compress(target_json), level


def decode(delta: TocDelta, data: bytes, base_value: bytes) -> bytes:
    """The TOC's bytes from its delta; checked against the digest its key names."""
    what = f"bundle TOC delta {delta.key}"
    if not 0 < delta.size <= MAX_TOC_JSON_BYTES or delta.level not in LEVELS:
        raise BundleError(f"{what}: size {delta.size} or level {delta.level} out of range")
    base_json = toc_json(base_value, f"{what}: its base {delta.base}")
    try:
        frame = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise BundleError(f"{what}: not a zstd frame: {exc}") from exc
    if frame.content_size != delta.size or frame.window_size > 1 << _MAX_WINDOW_LOG:
        raise BundleError(f"{what}: the frame does not declare {delta.size} bytes")
    dictionary = zstandard.ZstdCompressionDict(base_json, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    decompressor = zstandard.ZstdDecompressor(
        dict_data=dictionary, max_window_size=1 << _MAX_WINDOW_LOG
    )
    try:
        rebuilt = decompressor.decompress(data, max_output_size=delta.size)
    except zstandard.ZstdError as exc:
        raise BundleError(f"{what}: does not decompress: {exc}") from exc
    if len(rebuilt) != delta.size:
        raise BundleError(f"{what}: rebuilt {len(rebuilt)} bytes, not {delta.size}")
    value = _compress(rebuilt, delta.level)
    named = Digest.parse(delta.key.removeprefix("blob:"))
    try:
        named.verify(value, what)
    except LazyfsError as exc:
        raise BundleError(f"{what}: the rebuilt TOC does not match its digest") from exc
    return value


def _compress(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(data)


def _delta_compressor(base_json: bytes, target_size: int) -> zstandard.ZstdCompressor:
    span = len(base_json) + target_size
    window_log = min(_MAX_WINDOW_LOG, max(_MIN_WINDOW_LOG, span.bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        DELTA_LEVEL, window_log=window_log, enable_ldm=True, write_content_size=True
    )
    dictionary = zstandard.ZstdCompressionDict(base_json, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params)


def is_zstd(value: bytes) -> bool:
    return value.startswith(ZSTD_MAGIC)
