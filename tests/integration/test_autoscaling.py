"""The pool grows ahead of a join ramp and shrinks behind it, with the broadcaster following live."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from protos.fanout.v1 import allocator_pb2, common_pb2, stagemanager_pb2
from services.ivslocal.config import Settings as IvsSettings
from tests.integration.publisher_events import Broadcaster
from tests.integration.system import System, running_system
from tests.integration.waiting import eventually

SOFT = 50


async def room_stages(system: System) -> dict[str, str]:
    room = (await system.stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room="main"))).room
    name = common_pb2.StageState.Name
    return {s.arn: name(s.state).removeprefix("STAGE_STATE_") for s in room.stages if s.arn}


def scale_outs(system: System) -> float:
    registry = system.registries["stagemanager"]
    return (
        registry.get_sample_value(
            "fanout_autoscaler_decisions_total", {"room": "main", "action": "scale_out"}
        )
        or 0
    )


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
            if second_stage_at is None and scale_outs(system) > 0:
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
        assert second_stage_at is not None and second_stage_at < SOFT, (
            "Stage 2 was not ordered before Stage 1 filled"
        )
        assert len([s for s in states.values() if s == "LIVE"]) >= 500 // SOFT
        assert peak_overflow <= SOFT, f"peak overflow {peak_overflow}"

        def given_tokens() -> set[str]:
            added = {data["stageArn"] for name, data in broadcaster.events if name == "stage-added"}
            return added | {
                t["stageArn"]
                for name, data in broadcaster.events
                if name == "snapshot"
                for t in data["tokens"]
            }

        # A Stage made at the end of the ramp is on its way to the broadcaster's event stream.
        await eventually(
            lambda: set(states) <= given_tokens(), what="every Stage to reach the broadcaster with a token"
        )
        assert broadcaster.bad_tokens == []
        # Every Stage made during the show that went LIVE gave the autoscaler and the metric a sample.
        lead_samples = system.registries["stagemanager"].get_sample_value(
            "fanout_stage_lead_time_seconds_count"
        )
        # (Not the first Stage: it was made before the show. Some may be drained and gone already.)
        assert lead_samples is not None and 1 <= lead_samples <= scale_outs(system)
        print(
            f"ramp: 500 joins in {ramp_seconds:.1f}s, {len(states)} Stages, peak overflow {peak_overflow}, "
            f"first scale-out at viewer {second_stage_at}"
        )

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


async def test_stage_quota_overflows_to_the_hard_limit_then_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="services.stagemanager.rooms")
    capacity, min_free = 2, 1
    async with (
        running_system(
            tmp_path,
            ivs_settings=IvsSettings(port=0, stage_quota=2),
            FANOUT_STAGE_CAPACITY=str(capacity),
            FANOUT_STAGE_HARD_LIMIT="4",
            FANOUT_MIN_FREE_SLOTS=str(min_free),
            FANOUT_AUTOSCALER_TICK_SECONDS="0.1",
        ) as system,
        Broadcaster(system) as broadcaster,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: len(broadcaster.live) == 1, what="the first Stage to go LIVE")

        def quota_failures() -> float:
            return (
                system.registries["stagemanager"].get_sample_value(
                    "fanout_stage_creation_failures_total", {"room": "main", "reason": "quota"}
                )
                or 0
            )

        def caught_up(seated: int) -> bool:
            return len(broadcaster.live) * capacity - seated >= min_free or quota_failures() >= 1

        statuses, retry_after = [], None
        for i in range(10):
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"v{i}"}
            ) as response:
                statuses.append(response.status)
                if response.status == 503:
                    retry_after = response.headers.get("Retry-After")
                    error = (await response.json())["error"]
            # The audience arrives no faster than the autoscaler reacts: the next viewer comes once the
            # pool keeps its free seat (on Stages the allocator places on) or IVS has refused a Stage.
            await eventually(
                partial(caught_up, statuses.count(200)), what=f"the pool to catch up with viewer {i}"
            )
        async with http.get(f"{system.gateway_url}/api/rooms/main") as response:
            info = await response.json()
        failures = quota_failures()
    assert statuses == [200] * 8 + [503] * 2, statuses
    assert error["code"] == "no_capacity" and retry_after is not None and int(retry_after) > 0
    assert sorted(s["viewers"] for s in info["stages"] if s["stageArn"]) == [4, 4]
    assert "quota" in info["lastError"]
    assert failures >= 1
    reports = [r for r in caplog.records if "cannot create a Stage" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]


async def test_the_autoscaler_converges_under_ivs_throttling(tmp_path: Path) -> None:
    async with (
        running_system(
            tmp_path,
            # CreateStage at 1/s: our 5/s budget meets real 429s.
            ivs_settings=IvsSettings(port=0, rate_limits=True, rate_scale=0.2),
            FANOUT_STAGE_CAPACITY="20",
            FANOUT_MIN_FREE_SLOTS="5",
            FANOUT_AUTOSCALER_TICK_SECONDS="0.2",
        ) as system,
        Broadcaster(system) as broadcaster,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: len(broadcaster.live) == 1, what="the first Stage to go LIVE")

        async def join(i: int) -> int:
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"v{i}"}
            ) as response:
                return response.status

        statuses = []
        for burst in range(4):
            statuses += await asyncio.gather(*(join(burst * 50 + i) for i in range(50)))
            await asyncio.sleep(0.5)

        async def enough_live() -> bool:
            return len([s for s in (await room_stages(system)).values() if s == "LIVE"]) * 20 >= 200

        await eventually(enough_live, what="the pool to catch up with 200 viewers", within=40)
        throttled = system.registries["stagemanager"].get_sample_value(
            "fanout_ivs_calls_total", {"operation": "CreateStage", "outcome": "throttled"}
        )
    assert set(statuses) == {200}
    assert throttled is not None and throttled > 0
    # Every 429 we counted is one IVS sent; calls in flight at the end may not be counted yet.
    assert throttled <= system.ivs.stats.throttles["CreateStage"] <= throttled + 5


async def test_a_room_without_a_publisher_ends_after_the_idle_time(tmp_path: Path) -> None:
    async with (
        # The idle time runs from the room's creation, inside the publisher's first call: that call
        # (two Stages made, tokens minted) must return within it, also on a loaded machine.
        running_system(tmp_path, FANOUT_ROOM_IDLE_SECONDS="3", FANOUT_MIN_STAGES="2") as system,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{system.gateway_url}/api/token/publisher-all",
            json={"room": "quiet"},
            headers=system.publisher_headers(),
        ) as response:
            assert response.status == 200

        async def ended() -> bool:
            async with http.get(f"{system.gateway_url}/api/rooms/quiet") as response:
                return response.status == 404

        await eventually(ended, what="the idle room to end", within=10)
        left = await asyncio.to_thread(system.ivs.boto3_client().list_stages)
    assert [s for s in left["stages"] if s["tags"].get("fanout:room") == "quiet"] == []


async def test_ending_a_room_deletes_its_stages_and_tells_the_broadcaster(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="2") as system,
        Broadcaster(system) as broadcaster,
        aiohttp.ClientSession() as http,
    ):
        await eventually(lambda: len(broadcaster.live) == 2, what="both Stages LIVE")
        async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": "v"}) as response:
            assert response.status == 200
        async with http.delete(
            f"{system.gateway_url}/api/rooms/main", headers=system.publisher_headers()
        ) as response:
            assert response.status == 204
        await eventually(lambda: "room-ended" in broadcaster.names(), what="room-ended on the event stream")
        async with http.get(f"{system.gateway_url}/api/rooms/main") as response:
            assert response.status == 404
        async with http.post(
            f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": "v"}
        ) as response:
            assert response.status == 404
        left = await asyncio.to_thread(system.ivs.boto3_client().list_stages)
    assert left["stages"] == []
    assert broadcaster.removed == set(broadcaster.live) | broadcaster.removed
