"""model: pure data, the bottom layer (docs/architecture.md).

Owns: image references, digests, fs-verity digests, byte ranges, platforms, manifests, indexes
and configs, access profiles, and the byte-source protocol the resolver reads through.

May import: ``lazyfs.errors``, ``lazyfs.config`` and other ``model`` modules; the standard
library. Never imports: any other lazyfs folder, and no network, FUSE or cache library. Nothing
here does I/O but hashing bytes it is handed (``AccessProfile.load``/``save`` aside).
"""
