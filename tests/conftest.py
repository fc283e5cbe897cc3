"""Shared fixtures: the anyio backend (trio) and a session-wide local docker-registry."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lazyfs.registry.localserver import LocalRegistry

# Mount services that `lazyfs mount` starts on demand exit this soon after their last image:
# tests that unmount and check that nothing is left running need not wait the default 5 s.
os.environ.setdefault("LAZYFS_SERVICE_IDLE_EXIT_S", "0.3")


@pytest.fixture
def anyio_backend() -> str:
    """lazyfs runs on trio (pyfuse3's loop), so the async tests do too."""
    return "trio"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real distribution 2.8 registry on a free loopback port, shared by the session."""
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as local:
        yield local
