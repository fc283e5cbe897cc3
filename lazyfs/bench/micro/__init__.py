"""Micro-benchmarks of lazyfs's pieces, run as ``python -m lazyfs.bench.micro`` (``make bench``).

- :mod:`lazyfs.bench.micro.verity`: the userspace fs-verity digest against plain sha256
- :mod:`lazyfs.bench.micro.convert`: ``lazyfs convert`` throughput against zstd and gunzip
- :mod:`lazyfs.bench.micro.chunking`: the data behind the chunk-size defaults
- :mod:`lazyfs.bench.micro.mount`: a real lazy mount against curl and native files
- :mod:`lazyfs.bench.micro.common`, :mod:`lazyfs.bench.micro.inputs`: what they share

The cold-start benchmark (``lazyfs bench``) is the parent package; see docs/benchmarks.md.
"""
