"""Readers for layer formats other than zstd:chunked that lazyfs can mount lazily."""
