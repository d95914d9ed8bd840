"""The allocator's signing key reaches IVS once, and local restarts never exhaust the 3-key quota."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.integration.ivslocal_fixtures import running_ivslocal
from tests.integration.system import free_port, service_env, start_allocator_for


async def public_keys(ivs: object) -> list[dict[str, str]]:
    client = ivs.boto3_client()  # type: ignore[attr-defined]
    return (await asyncio.to_thread(client.list_public_keys))["publicKeys"]


async def test_a_restart_reuses_the_imported_key(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        env = service_env(ivs.url, tmp_path, {})
        for _ in range(2):
            allocator = await start_allocator_for(env, free_port())
            await allocator.stop(0)
        keys = await public_keys(ivs)
    assert len(keys) == 1


async def test_new_local_keys_replace_stale_ones_instead_of_hitting_the_quota(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        for attempt in range(5):
            # A fresh state folder each time, as a pod with an emptyDir gets after every restart.
            env = service_env(ivs.url, tmp_path / f"pod-{attempt}", {})
            allocator = await start_allocator_for(env, free_port())
            await allocator.stop(0)
        keys = await public_keys(ivs)
    assert 1 <= len(keys) <= 3
    assert ivs.stats.throttles == {} or sum(ivs.stats.throttles.values()) == 0
