"""A broadcaster publishing in room main and some viewers: the state the observability tests look at."""

from __future__ import annotations

import aiohttp

from tests.integration.system import System


async def place_viewers(system: System, count: int) -> None:
    """A publishing broadcaster and `count` viewers, so every labelled series has at least one child."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.gateway_url}/api/token/publisher-all", json={}, headers=system.publisher_headers()
        ) as response:
            assert response.status == 200
            arn = (await response.json())["tokens"][0]["stageArn"]
        async with http.post(
            f"{system.gateway_url}/api/rooms/main/publisher/status",
            json={"stageArn": arn, "publishing": True},
            headers=system.publisher_headers(),
        ) as response:
            assert response.status == 204
        for index in range(count):
            async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": f"v{index}"}) as r:
                assert r.status == 200
