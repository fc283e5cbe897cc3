"""cache: the local cache directory, and the one owner of its layout (docs/architecture.md).

Owns: ``layout`` (every path under the cache directory is named there and nowhere else),
``store`` (the chunk store, by fs-verity digest and LRU-bounded, and the metadata store),
``keys`` (the metadata keys), ``blobs`` (whole blobs kept on disk: locally converted layers and
proxy-sent blobs; also a byte source).

May import: ``model``, ``errors``, ``config``, ``localfiles``; diskcache. Never imports:
``registry``, ``formats``, ``convert``, ``mount``, ``cli``: it stores bytes it is handed, already
verified, and knows nothing of where they came from. Its methods block: callers use worker
threads (docs/concurrency.md).
"""
