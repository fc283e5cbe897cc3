"""zstd:chunked layers, as containers/storage defines them, with lazyfs's fs-verity fields.

``toc`` (TOC entries, positions, footer), ``tarsplit`` (the tar-split stream), ``writer``
(tar -> zstd:chunked), ``ranks`` (access-profile ranks in the TOC). See lazyfs/formats/__init__.py
for what this folder may import.
"""
