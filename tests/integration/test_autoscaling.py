"""The pool grows ahead of a join ramp and shrinks behind it, with the broadcaster following live."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from protos.fanout.v1 import allocator_pb2, common_pb2, stagemanager_pb2
from tests.integration.publisher_events import Broadcaster
from tests.integration.system import System, running_system
from tests.integration.waiting import eventually

SOFT = 50


async def room_stages(system: System) -> dict[str, str]:
    room = (await system.stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room="main"))).room
    name = common_pb2.StageState.Name
    return {s.arn: name(s.state).removeprefix("STAGE_STATE_") for s in room.stages if s.arn}


async def occupancy(system: System) -> dict[str, int]:
    result = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))
    return {s.stage_arn: s.viewers for s in result.stages}


async def test_join_ramp_grows_the_pool_ahead_and_drains_it_behind(tmp_path: Path) -> None:
    async with (
        running_system(
            tmp_path,
            FANOUT_STAGE_CAPACITY=str(SOFT),
            FANOUT_MIN_FREE_SLOTS="10",
            FANOUT_AUTOSCALER_TICK_SECONDS="0.2",
            FANOUT_SCALE_IN_COOLDOWN_SECONDS="0.5",
        ) as system,
        Broadcaster(system) as broadcaster,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: len(broadcaster.live) == 1, what="the first Stage to go LIVE")
        placed: dict[str, str] = {}
        violations, refused, peak_overflow = [], 0, 0
        second_stage_at: int | None = None
        started = time.monotonic()
        for i in range(500):
            # About 100 joins a second, one at a time, so each placement can be checked exactly.
            await asyncio.sleep(max(0.0, started + i / 100 - time.monotonic()))
            before = await occupancy(system)
            live_before = {arn for arn, at in broadcaster.live.items() if arn in before}
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"v{i}"}
            ) as response:
                if response.status != 200:
                    refused += 1
                    continue
                arn = (await response.json())["stageArn"]
            placed[f"v{i}"] = arn
            if before.get(arn, 0) >= SOFT and any(before[other] < SOFT for other in live_before):
                violations.append((i, arn, before))
            if second_stage_at is None and len(broadcaster.live) >= 2:
                second_stage_at = i
            overflow = sum(max(0, n - SOFT) for n in before.values())
            peak_overflow = max(peak_overflow, overflow)
        ramp_seconds = time.monotonic() - started
        counts = await occupancy(system)
        states = await room_stages(system)

        assert refused == 0
        assert violations == [], violations[:3]
        assert max(counts.values()) <= 10_000
        assert sum(counts.values()) == 500
        assert second_stage_at is not None and second_stage_at < SOFT, "the pool grew before Stage 1 filled"
        assert len([s for s in states.values() if s == "LIVE"]) >= 500 // SOFT
        assert peak_overflow <= SOFT, f"peak overflow {peak_overflow}"
        added = [data["stageArn"] for name, data in broadcaster.events if name == "stage-added"]
        snapshot = [
            t["stageArn"] for name, data in broadcaster.events if name == "snapshot" for t in data["tokens"]
        ]
        assert set(states) == set(added) | set(snapshot), "every Stage reached the broadcaster with a token"
        assert broadcaster.bad_tokens == []
        print(f"ramp: 500 joins in {ramp_seconds:.1f}s, {len(states)} Stages, peak overflow {peak_overflow}")

        # Everyone leaves but 20 viewers who stay put: their Stages must outlive the scale-in.
        stayers = {user: placed[user] for user in list(placed)[::25]}
        for user in placed:
            if user not in stayers:
                async with http.post(
                    f"{system.gateway_url}/api/viewer/leave", json={"room": "main", "userId": user}
                ) as response:
                    assert response.status == 204

        async def shrunk() -> bool:
            now = await room_stages(system)
            active = [arn for arn, state in now.items() if state in ("LIVE", "STANDBY")]
            return len(active) == 1 and set(stayers.values()) <= set(now)

        await eventually(shrunk, what="the pool to drain down", within=30)
        for user, arn in stayers.items():
            async with http.post(
                f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": user}
            ) as response:
                assert response.status == 200 and (await response.json())["stageArn"] == arn
            async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user}) as response:
                assert (await response.json())["stageArn"] == arn, "sticky even on a DRAINING Stage"
        assert not set(stayers.values()) & broadcaster.removed, "no Stage with a viewer was deleted"

        for user in stayers:
            async with http.post(
                f"{system.gateway_url}/api/viewer/leave", json={"room": "main", "userId": user}
            ):
                pass

        async def at_minimum() -> bool:
            return len(await room_stages(system)) == 1

        await eventually(at_minimum, what="the drained Stages to be deleted", within=30)
        remaining = await room_stages(system)
        await eventually(
            lambda: set(states) - set(remaining) <= broadcaster.removed,
            what="stage-removed events for every deleted Stage",
        )
