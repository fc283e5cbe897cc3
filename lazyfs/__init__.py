"""lazyfs: mount remote OCI container images lazily, with fs-verity-verified chunks."""

__version__ = "0.1.0"
