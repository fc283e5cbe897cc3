"""formats: the layer formats lazyfs reads and writes (docs/format.md).

Owns: zstd:chunked (``chunked/``: TOC, footer, tar-split, the writer, access-profile ranks),
eStargz (footer, TOC, gzip members), and plain layers (decompressing a whole blob to its tar).
Every field an image author controls is checked here, where it is parsed.

May import: ``model``, ``errors``, ``config``; zstandard, zlib, fastcdc and fastcrc. Never
imports: ``cache``, ``registry``, ``convert``, ``mount``, ``cli``; nothing here fetches or
caches. The zstd:chunked writer runs worker processes of its own
(``python -m lazyfs.formats.chunked.workers``), which exit when their stdin closes.
"""
