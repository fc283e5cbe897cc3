"""mount: serving an image through FUSE (docs/concurrency.md, docs/architecture.md).

Owns: ``fuseops`` (the FUSE operations: the only module that raises ``pyfuse3.FUSEError``,
mapping domain errors to an errno in one place), ``resolver`` (chunks: cache, singleflight,
fetch, verify), ``readahead`` and ``prefetch``, ``tree`` (the merged tree of layers),
``metadata`` and ``opener`` (opening an image: manifest, config and TOCs, verified, with the
cache as fallback), ``sources`` (the byte source a mount reads), ``session`` (one mounted image:
the pyfuse3 session and its lifetime) and ``mountinfo`` (reading /proc/self/mountinfo).

May import: ``cache``, ``registry``, ``convert``, ``formats``, ``model``, ``errors``, ``config``,
``localfiles``. Never imports: ``cli``, ``bench``. The resolver sees only the byte-source
protocol (``model.bytesource``): importing it does not import httpx.
"""
