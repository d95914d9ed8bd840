"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from tests.integration.ivslocal_fixtures import ivslocal  # noqa: F401 - a fixture, used by name
from tests.integration.system import System, running_system


@pytest_asyncio.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    """The whole control plane on loopback ports: IVS emulator, stage manager, allocator, gateway."""
    async with running_system(tmp_path) as running:
        yield running
