"""The regional concurrent-subscription quota holds across rooms and allocator replicas, and the
refusal names it (ivs-facts §3: 20,000 per region by default, every Stage of the account together)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import pytest

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from tests.integration.system import System, running_system, start_allocator_for, wait_until_serving
from tests.integration.test_viewers import room_info, start_show
from tests.integration.waiting import eventually
from tests.redis_server import RedisServer

QUOTA = 100


async def join_through_gateway(http: aiohttp.ClientSession, system: System, room: str, user: str) -> str:
    async with http.post(
        f"{system.gateway_url}/api/token/viewer", json={"room": room, "userId": user}
    ) as answer:
        body = await answer.json()
        if answer.status == 200:
            return "placed"
        assert answer.status == 503 and int(answer.headers["Retry-After"]) >= 1, (answer.status, body)
        assert "FANOUT_REGION_SUBSCRIPTION_QUOTA" in body["error"]["message"], body
        return str(body["error"]["code"])


async def join_through_grpc(stub: allocator_pb2_grpc.AllocatorStub, room: str, user: str) -> str:
    try:
        await stub.AssignViewer(allocator_pb2.AssignViewerRequest(room=room, user_id=user), timeout=10)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return dict(error.trailing_metadata() or ())["fanout-error-code"]
    return "placed"


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_two_rooms_never_place_more_than_the_region_quota_together(
    tmp_path: Path, private_redis: RedisServer, store: str
) -> None:
    env = {
        "FANOUT_REGION_SUBSCRIPTION_QUOTA": str(QUOTA),
        "FANOUT_STAGE_CAPACITY": "20",
        "FANOUT_MIN_STAGES": "2",
    }
    if store == "redis":
        env |= {"FANOUT_STORE": "redis", "FANOUT_REDIS_URL": private_redis.url}
    async with running_system(tmp_path, **env) as system, aiohttp.ClientSession() as http:
        for room in ("one", "two"):
            await start_show(http, system, room=room)
        assert await join_through_gateway(http, system, "one", "early") == "placed"
        joins = [join_through_gateway(http, system, ("one", "two")[i % 2], f"web-{i}") for i in range(80)]
        second = None
        if store == "redis":
            # A second allocator replica on the same Redis takes half the crowd at the same time.
            second = await start_allocator_for(
                {**system.env, "FANOUT_ALLOCATOR_LISTEN": "127.0.0.1:0"}, system.stagemanager_service.port
            )
            await wait_until_serving(second.port)
            stub = allocator_pb2_grpc.AllocatorStub(system.channel(f"127.0.0.1:{second.port}"))
            joins += [join_through_grpc(stub, ("one", "two")[i % 2], f"grpc-{i}") for i in range(80)]
        else:
            joins += [
                join_through_gateway(http, system, ("one", "two")[i % 2], f"more-{i}") for i in range(80)
            ]
        try:
            outcomes = Counter(await asyncio.gather(*joins))
            occupancy = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest())
            # A viewer already placed keeps its seat and gets a fresh token at the quota.
            again = await join_through_gateway(http, system, "one", "early")
            registry = system.registries["allocator"]
            await eventually(
                lambda: registry.get_sample_value("fanout_region_subscriptions") == QUOTA,
                what="the regional headroom on the allocator's metrics",
            )
            quota_gauge = registry.get_sample_value("fanout_region_subscription_quota")
            info = await room_info(http, system, room="two")
        finally:
            if second is not None:
                await second.stop(0)
    assert outcomes == {"placed": QUOTA - 1, "capacity_exhausted": 61}, outcomes
    assert sum(room.viewers for room in occupancy.rooms) == QUOTA
    assert {room.room for room in occupancy.rooms if room.viewers} == {"one", "two"}
    assert again == "placed"
    assert quota_gauge == QUOTA
    capacity = info["capacity"]
    assert capacity["regionSubscriptions"] == capacity["regionSubscriptionQuota"] == QUOTA
    assert capacity["stageHardLimit"] == 10_000
    # The room's own ceiling is what the region leaves it: the other room's viewers are taken.
    assert capacity["bindingLimit"] == "region_subscriptions"
    assert capacity["ceiling"] == info["viewers"] < QUOTA
    assert "FANOUT_REGION_SUBSCRIPTION_QUOTA" in capacity["bindingLimitDescription"]
