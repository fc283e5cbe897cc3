"""Helpers shared by the tests that run RegistryClient against tests/faultserver.py (the
``server`` and ``client`` fixtures are in conftest.py)."""

from __future__ import annotations

import os

from faultserver import FaultServer

from lazyfs.config import RetryConfig
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference

# Three attempts, backoffs short enough that a test of retries takes milliseconds.
FAST_RETRY = RetryConfig(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)


def ref_on(server: FaultServer, repo: str = "test/app") -> Reference:
    return Reference.parse(f"{server.host}/{repo}:latest")


def add_blob(server: FaultServer, size: int = 10_000) -> tuple[bytes, Digest]:
    """``size`` random bytes served by ``server`` as a blob; the bytes and their digest."""
    data = os.urandom(size)
    return data, Digest.parse(server.add_blob(data))
