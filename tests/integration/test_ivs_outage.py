"""IVS gone (connections refused) or hung (nothing answers) under a running system: 503s with the
error shape, never a 500 or a hang; what needs no IVS call keeps working; recovery by itself."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from services.common.timeouts import GATEWAY_ROOM_RPC_SECONDS, IVS_CONNECT_SECONDS, IVS_READ_SECONDS
from tests.integration.fault_proxy import Fault, fault_proxy
from tests.integration.system import System, running_system
from tests.integration.test_viewers import room_info, start_show
from tests.integration.waiting import eventually


async def call(
    http: aiohttp.ClientSession, system: System, method: str, path: str, body: dict | None = None
) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with http.request(
        method, f"{system.gateway_url}{path}", json=body, headers=system.publisher_headers()
    ) as response:
        payload = await response.json() if response.content_type == "application/json" else {}
        return response.status, payload, time.monotonic() - started


def is_error_shape(body: dict) -> bool:
    return set(body) == {"error"} and set(body["error"]) == {"code", "message"}


async def test_ivs_gone_or_hung_answers_503_and_the_system_recovers(tmp_path: Path) -> None:
    async with (
        fault_proxy() as proxy,
        running_system(tmp_path, ivs_through=proxy, FANOUT_MIN_STAGES="1") as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        before = await room_info(http, system)

        await proxy.set(Fault.GONE)
        viewer = await call(http, system, "POST", "/api/token/viewer", {"userId": "v1"})
        new_room = await call(http, system, "POST", "/api/token/publisher-all", {"room": "later"})
        end_gone = await call(http, system, "DELETE", "/api/rooms/main")

        await proxy.set(Fault.HUNG)
        end_hung = await call(http, system, "DELETE", "/api/rooms/main")
        unchanged = await room_info(http, system)

        await proxy.set(Fault.NONE)

        async def later_room_starts() -> bool:
            return (await call(http, system, "POST", "/api/token/publisher-all", {"room": "later"}))[0] == 200

        await eventually(later_room_starts, what="a new room once IVS is back", within=30)
        ended = await call(http, system, "DELETE", "/api/rooms/main")

        async def main_gone() -> bool:
            return (await call(http, system, "GET", "/api/rooms/main"))[0] == 404

        await eventually(main_gone, what="the room to end once IVS is back", within=30)

    assert viewer[0] == 200, "self-signed viewer tokens need no IVS call"
    assert new_room[0] == 503 and is_error_shape(new_room[1]), new_room
    assert new_room[2] < GATEWAY_ROOM_RPC_SECONDS
    for status, body, _ in (end_gone, end_hung):
        assert status == 503 and is_error_shape(body), (status, body)
    assert end_hung[2] < IVS_CONNECT_SECONDS + IVS_READ_SECONDS + 2.0, "a hung IVS costs one bounded call"
    # A refused ending changed nothing: the room still has its Stage, in its state, taking viewers.
    assert [(s["stageArn"], s["state"]) for s in unchanged["stages"]] == [
        (s["stageArn"], s["state"]) for s in before["stages"]
    ]
    assert ended[0] == 204
