"""What the monitor reports reaches placement (observed viewers) and Stage states (publisher presence)."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from protos.fanout.v1 import allocator_pb2, common_pb2, stagemanager_pb2
from tests.integration.system import running_system
from tests.integration.waiting import eventually


def at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def observation(
    room: str, arn: str, publishers: int, subscribers: int, when: float
) -> common_pb2.StageObservation:
    return common_pb2.StageObservation(
        room=room, stage_arn=arn, publishers=publishers, subscribers=subscribers, observed_at=at(when)
    )


async def test_observed_viewers_count_for_placement_until_stale(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="2", FANOUT_OBSERVATION_TTL_SECONDS="2") as system,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{system.gateway_url}/api/token/publisher-all", json={}, headers=system.publisher_headers()
        ) as response:
            first, second = [t["stageArn"] for t in (await response.json())["tokens"]]
        await system.allocator.ReportObservedViewers(
            allocator_pb2.ReportObservedViewersRequest(
                observations=[observation("main", first, 1, 5, time.time())]
            )
        )
        placed = []
        for i in range(4):
            async with http.post(
                f"{system.gateway_url}/api/token/viewer", json={"userId": f"u{i}"}
            ) as response:
                placed.append((await response.json())["stageArn"])
        occupancy = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))
        assert placed == [second] * 4, "the first Stage holds 5 viewers IVS sees but nobody leased"
        by_arn = {s.stage_arn: s for s in occupancy.stages}
        assert (by_arn[first].leased, by_arn[first].observed, by_arn[first].viewers) == (0, 5, 5)
        assert occupancy.rooms[0].joins_total == 4

        async def observation_expired() -> bool:
            result = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))
            return {s.stage_arn: s.observed for s in result.stages}[first] == 0

        await eventually(observation_expired, what="the observation to go stale", within=5)


async def test_bad_observations_are_refused(system) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await system.allocator.ReportObservedViewers(
            allocator_pb2.ReportObservedViewersRequest(
                observations=[observation("main", "not-an-arn", 0, 1, time.time())]
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_monitor_confirms_live_and_flags_a_vanished_publisher(tmp_path: Path) -> None:
    async with running_system(tmp_path, FANOUT_MIN_STAGES="2") as system:
        stagemanager = system.stagemanager
        room = (await stagemanager.EnsureRoom(stagemanager_pb2.EnsureRoomRequest(room="main"))).room
        first, second = room.stages[0].arn, room.stages[1].arn
        before = time.time()
        await stagemanager.ReportPublisherStatus(
            stagemanager_pb2.ReportPublisherStatusRequest(room="main", stage_arn=second, publishing=True)
        )
        await stagemanager.ReportObservations(
            stagemanager_pb2.ReportObservationsRequest(
                observations=[
                    observation("main", first, 1, 0, time.time() + 0.01),
                    # Taken before the page's report: must not undo it.
                    observation("main", second, 0, 0, before),
                ]
            )
        )
        states = await stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room="main"))
        assert [s.state for s in states.room.stages] == [
            common_pb2.STAGE_STATE_LIVE,
            common_pb2.STAGE_STATE_LIVE,
        ]

        await stagemanager.ReportObservations(
            stagemanager_pb2.ReportObservationsRequest(
                observations=[observation("main", second, 0, 3, time.time() + 30)]
            )
        )
        after = await stagemanager.GetRoom(stagemanager_pb2.GetRoomRequest(room="main"))
        assert [s.state for s in after.room.stages] == [
            common_pb2.STAGE_STATE_LIVE,
            common_pb2.STAGE_STATE_STANDBY,
        ]
        assert after.room.publishing
