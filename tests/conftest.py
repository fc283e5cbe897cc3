"""Shared fixtures: the anyio backend (trio) and a session-wide local docker-registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lazyfs.registry.localserver import LocalRegistry


@pytest.fixture
def anyio_backend() -> str:
    """lazyfs runs on trio (pyfuse3's loop), so the async tests do too."""
    return "trio"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A real distribution 2.8 registry on a free loopback port, shared by the session."""
    with LocalRegistry(tmp_path_factory.mktemp("registry")) as local:
        yield local
