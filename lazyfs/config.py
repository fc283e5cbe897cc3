"""Configuration: frozen dataclasses, units in the field names. A pure leaf."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# The virtual extended attribute of a mount's root that `lazyfs stats` reads (JSON); not
# listed by listxattr.
STATS_XATTR = b"user.lazyfs.stats"


@dataclass(frozen=True)
class RetryConfig:
    """Retry policy for transient registry failures (used by the network layer only)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0


def default_per_host_cert_dirs() -> tuple[Path, ...]:
    """Where registry ``HOST[:PORT]`` finds its certificates, in containers/image's order:
    the user's ``~/.config/containers/certs.d``, then ``/etc/containers/certs.d`` and
    ``/etc/docker/certs.d``."""
    home = os.environ.get("HOME")
    user = (Path(home) / ".config" / "containers" / "certs.d",) if home else ()
    return (*user, Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


@dataclass(frozen=True)
class ProxyConfig:
    """HTTP_PROXY, HTTPS_PROXY and NO_PROXY (or their lowercase forms, the uppercase one first,
    as Go's net/http reads them); empty: unset. Applied by lazyfs/registry/proxy.py."""

    http_proxy: str = ""
    https_proxy: str = ""
    no_proxy: str = ""

    @classmethod
    def from_environment(cls) -> ProxyConfig:
        def first(*names: str) -> str:
            return next((os.environ[n] for n in names if os.environ.get(n)), "")

        return cls(
            first("HTTP_PROXY", "http_proxy"),
            first("HTTPS_PROXY", "https_proxy"),
            first("NO_PROXY", "no_proxy"),
        )


@dataclass(frozen=True)
class RegistryConfig:
    """How to talk to registries."""

    connect_timeout_s: float = 10.0
    fetch_timeout_s: float = 60.0
    # None: verify TLS except for loopback registries, which use plain HTTP (as docker does).
    tls_verify: bool | None = None
    # --cert-dir: its *.crt (CAs) and *.cert + *.key (client pairs) serve every registry, and
    # replace the per-host directories, as in skopeo.
    cert_dir: Path | None = None
    # Without cert_dir, registry HOST[:PORT] uses the first DIR/HOST[:PORT] that exists.
    per_host_cert_dirs: tuple[Path, ...] = field(default_factory=default_per_host_cert_dirs)
    # Hosts ("host:port") spoken to without TLS verification, and over HTTP if they lack TLS.
    insecure_registries: frozenset[str] = frozenset()
    max_connections: int = 16
    # Blobs larger than this are uploaded in chunks (PATCH), smaller ones in one PUT.
    monolithic_upload_max_bytes: int = 64 << 20
    upload_chunk_bytes: int = 16 << 20
    retry: RetryConfig = field(default_factory=RetryConfig)
    # A body stalls when fewer than stall_min_bytes arrive within stall_timeout_s (a trickle
    # counts as a stall); the attempt then fails as transient and is retried. httpx's timeouts
    # (fetch_timeout_s) apply to each socket read, so a trickling body never meets them.
    stall_timeout_s: float = 30.0
    stall_min_bytes: int = 16 << 10
    # Proxies for registry, token and redirect requests: this process's environment.
    proxy: ProxyConfig = field(default_factory=ProxyConfig.from_environment)


@dataclass(frozen=True)
class ChunkingConfig:
    """Content-defined chunking and compression for converted layers.

    The defaults were chosen by measurement; see docs/chunking.md.
    """

    min_chunk_bytes: int = 16 << 10
    avg_chunk_bytes: int = 64 << 10
    max_chunk_bytes: int = 256 << 10
    zstd_level: int = 3
    # Processes that compress and hash a layer; 0: one per CPU this process may run on. The blob
    # is the same for any number (docs/chunking.md, "Convert throughput").
    workers: int = 0


@dataclass(frozen=True)
class ResolverConfig:
    """How reads turn into range requests. See docs/concurrency.md."""

    # Chunks of one blob closer than this are fetched in one request, gap included: a loopback
    # request costs ~0.35 ms, about what 64 KiB costs to send at 1.5 Gbit/s.
    merge_gap_bytes: int = 32 << 10
    max_request_bytes: int = 8 << 20
    max_concurrent_fetches: int = 8
    # Ranges per multi-range request (multipart/byteranges); 1 disables multi-range.
    max_ranges_per_request: int = 16
    read_deadline_s: float = 120.0
    # Readahead after a miss (lazyfs/mount/readahead.py): the rest of the missed file up to the
    # maximum (0 turns read-ahead off), which is also the budget's credit before any read has
    # needed anything; for the next files, about one bandwidth-delay product, at least the minimum.
    readahead_min_bytes: int = 64 << 10
    readahead_max_bytes: int = 4 << 20
    # Of a file's rest, what its first miss brings; a later miss brings the rest up to the
    # maximum (ReadaheadBudget.rest_of_file_share): a file read in part costs one window.
    readahead_first_bytes: int = 256 << 10
    # Of that, what may go to the files after the missed one (the rest of the missed file may
    # take all of it), also about one bandwidth-delay product: more of them go unused than are
    # read, and on a high-RTT link each round trip saved still pays (docs/benchmarks.md).
    readahead_next_files_max_bytes: int = 256 << 10
    # The next files are those of the missed file's directory only, and each directory earns
    # its share: the first this much, then this gain for each byte of its read-ahead that reads
    # used, never less than the least (ReadaheadBudget.directory_share). Replayed on the
    # bench's python image with three workloads (docs/benchmarks.md, "Read-ahead by
    # directory"): 57, 74 and 71 round trips for 1.23, 1.25 and 1.29x the bytes needed.
    readahead_directory_bytes: int = 192 << 10
    readahead_directory_gain: float = 2.0
    readahead_directory_min_bytes: int = 16 << 10
    # Prefetch of an access profile (lazyfs/mount/prefetch.py): batches of about this many
    # compressed bytes, this many at a time. Reads join a batch chunk by chunk as its bytes
    # arrive (mount/earlyframes.py), so a big batch no longer delays the first chunks: with
    # 8 MiB x 2 a profile laid out first (`convert --prefetch`) comes in one range per layer,
    # or a few. Measured (python image, `lazyfs bench --mode lazy-prefetch`, docs/benchmarks.md
    # "Early frames", stop 20) against 1 MiB x 4: 5-6 requests instead of 14-16; loopback
    # 1.54-1.67 s against 2.26-2.30 s, wan 2.53-2.62 against 2.73-2.98, edge 6.46-6.52 against
    # 6.64-6.69. It leaves most fetch slots to demand misses.
    prefetch_batch_bytes: int = 8 << 20
    prefetch_concurrency: int = 2
    # Verified chunks kept in memory, most recently used (resolver.RecentChunks); 0: none.
    memory_cache_bytes: int = 64 << 20


@dataclass(frozen=True)
class CacheConfig:
    """The local chunk and metadata cache."""

    directory: Path
    # Everything under the directory; None: the bound stored with the cache (cache/bound.py:
    # 10 GiB for a new one). Another value replaces the stored bound.
    size_limit_bytes: int | None = None
    # Re-hash chunks read back from the cache. Off by default; see docs/benchmarks.md.
    verify_reads: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    """What one image may make a node parse and hold; beyond these it is refused.

    Whoever publishes an image controls its manifest, TOCs and blobs, so sizes and counts in
    them are claims, not facts. The defaults, measured in docs/reliability.md: a lazyfs TOC
    takes about 455 bytes of JSON and 1.5 KB of parsed memory per entry, so 256 MiB of JSON
    holds about 590,000 files, and a million entries parse into about 1.5 GiB.
    """

    # One layer's TOC JSON (zstd:chunked, eStargz), uncompressed and as fetched.
    max_toc_bytes: int = 256 << 20
    max_toc_compressed_bytes: int = 128 << 20
    max_toc_entries: int = 1_000_000
    # One layer's tar-split, uncompressed: about 1.2 KB per tar member (measured), so 900,000.
    max_tar_split_bytes: int = 1 << 30
    # One chunk, uncompressed; its compressed range may be twice this. Runs of zeros
    # (chunkType "zeros", never fetched) are exempt. eStargz chunks are 4 MiB by default,
    # lazyfs's at most 256 KiB, containers/storage's about 64 KiB on average.
    max_chunk_bytes: int = 64 << 20
    # Layers of one image manifest (overlayfs stacks at most about 500 lower directories).
    max_image_layers: int = 500
    # An image config blob (configs with a long history are a few hundred KiB).
    max_config_bytes: int = 16 << 20
    # All TOCs of one image together (a manifest may list max_image_layers layers, each with a
    # TOC up to the caps above): checked from the manifest's position annotations before any
    # TOC is fetched, and as eStargz TOCs (whose sizes no annotation gives) arrive.
    max_image_toc_bytes: int = 512 << 20
    max_image_toc_compressed_bytes: int = 256 << 20
    # Entries of all the image's TOCs: about 1.5 KB each once parsed, so about 1.5 GiB.
    max_image_toc_entries: int = 1_000_000
