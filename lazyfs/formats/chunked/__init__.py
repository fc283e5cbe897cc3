"""zstd:chunked layers, as containers/storage defines them, with lazyfs's fs-verity fields.

``toc`` (TOC entries, positions, footer), ``tarsplit`` (the tar-split stream), ``ranks``
(access-profile ranks in the TOC), ``order`` (the profile-first member order of a layer's tar,
written before the writer runs), and the writer (tar -> zstd:chunked): ``writer`` (the
orchestration and the public ``write_chunked_layer``), ``members`` (tar members as TOC
entries), ``chunker`` (content-defined chunk boundaries in bounded windows), ``frames`` (the
frames and digests of a batch of tar ranges) and ``workers`` (batches run on every core, in
worker processes). See lazyfs/formats/__init__.py for what this folder may import.
"""
