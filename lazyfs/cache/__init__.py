"""cache: the local cache directory, and the one owner of its layout (docs/architecture.md).

Owns: ``layout`` (every path under the cache directory is named there and nowhere else),
``store`` (the chunk store, by fs-verity digest and LRU-bounded, and the metadata store),
``keys`` (the metadata keys), ``blobs`` (whole blobs kept on disk: locally converted layers and
proxy-sent blobs; also a byte source), ``bound`` (the size bound stored with the cache),
``usage`` (what the bound counts), ``pins`` (chunks kept from eviction, in the chunk store's
database), ``maintenance`` (``lazyfs cache``).

May import: ``model``, ``errors``, ``config``, ``localfiles``; diskcache. Never imports:
``registry``, ``formats``, ``convert``, ``mount``, ``cli``: it stores bytes it is handed, already
verified, and knows nothing of where they came from. Its methods block: callers use worker
threads (docs/concurrency.md).
"""
