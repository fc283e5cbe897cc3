"""Shared fixtures: the anyio backend (trio), a session-wide local docker-registry, a mount
service of each test's own, and a fault-injecting server with a RegistryClient to talk to it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from faultserver import FaultServer
from test_service import Served, lazyfs_mounts, start_service, stop

from lazyfs.config import RegistryConfig
from lazyfs.registry.client import RegistryClient
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


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Served]:
    """A ``lazyfs serve`` of the test's own, under ``tmp_path/svc``; stopped after the test,
    and any lazyfs mount it left under ``tmp_path`` detached."""
    served = start_service(tmp_path / "svc")
    try:
        yield served
    finally:
        stop(served)
        for mountpoint in lazyfs_mounts():
            if str(mountpoint).startswith(str(tmp_path)):
                subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    """A fault-injecting registry (tests/faultserver.py) of the test's own, on loopback."""
    with FaultServer() as fault_server:
        yield fault_server


@pytest.fixture
def registry_config() -> RegistryConfig:
    """What the ``client`` fixture is made with; a test module overrides this fixture to set
    its own retries or stall timeout."""
    return RegistryConfig()


@pytest.fixture
async def client(registry_config: RegistryConfig) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(registry_config) as registry_client:
        yield registry_client
