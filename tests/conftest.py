"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.ivslocal_fixtures import ivslocal  # noqa: F401 - a fixture, used by name
from tests.integration.system import System, running_system
from tests.redis_server import RedisServer


@pytest_asyncio.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    """The whole control plane on loopback ports: IVS emulator, stage manager, allocator, gateway."""
    async with running_system(tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the whole run; tests keep apart by key namespace."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop, freeze and restart without touching others."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
