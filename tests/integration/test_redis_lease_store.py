"""The Redis lease store on a real Redis: the shared contract, racing replicas, allocator restarts."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc
from services.allocator.redis_store import RedisLeaseStore, open_redis_client
from services.allocator.store import LeaseStore
from tests.integration.system import (
    System,
    free_port,
    running_system,
    start_allocator_for,
    wait_until_serving,
)
from tests.integration.test_viewers import room_info, start_show
from tests.unit.test_lease_store import LEASE, ROOM, T0, LeaseStoreContract, stage

# These tests drive the raw store for its logic, many calls at once: on a busy machine a call may wait
# longer for a pooled connection than the allocator's own deadline allows, which is not their subject.
RAW_STORE_TIMEOUT = 30.0


def unique_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def delete_namespace(redis_url: str, namespace: str) -> None:
    async with redis.Redis.from_url(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"fanout:{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)


@pytest.fixture
async def namespace(redis_url: str) -> AsyncIterator[str]:
    name = unique_namespace()
    yield name
    await delete_namespace(redis_url, name)


class TestRedisLeaseStore(LeaseStoreContract):
    @pytest.fixture
    async def store(self, redis_url: str, namespace: str) -> AsyncIterator[LeaseStore]:
        store = RedisLeaseStore(open_redis_client(redis_url, timeout=RAW_STORE_TIMEOUT), namespace)
        yield store
        await store.close()  # a second close (a test may close first) is harmless


async def test_keys_stay_under_the_namespace_with_the_room_as_hash_tag(
    redis_url: str, namespace: str
) -> None:
    store = RedisLeaseStore(open_redis_client(redis_url, timeout=RAW_STORE_TIMEOUT), namespace)
    await store.assign(ROOM, "u1", [stage(0)], {stage(0).stage_arn}, 1, 1, LEASE, T0)
    await store.close()
    async with redis.Redis.from_url(redis_url) as client:
        keys = sorted([key.decode() async for key in client.scan_iter(match=f"fanout:{namespace}:*")])
    assert keys, "the store wrote nothing"
    room_keys = [key for key in keys if ":room:" in key]
    assert all(key.startswith(f"fanout:{namespace}:room:{{{ROOM}}}:") for key in room_keys), keys
    assert set(keys) - set(room_keys) == {
        f"fanout:{namespace}:rooms",
        f"fanout:{namespace}:joined-rooms",
        f"fanout:{namespace}:region-leases",
    }


@pytest.mark.parametrize(
    ("seed", "soft", "hard", "viewers"),
    [(0, 40, 120, 300), (1, 20, 50, 300), (2, 5, 70, 200), (3, 30, 100, 360)],
)
async def test_replicas_racing_never_overfill_and_stay_balanced(
    redis_url: str, namespace: str, seed: int, soft: int, hard: int, viewers: int
) -> None:
    """Two stores on two clients, as two allocator replicas; every request of a storm in flight at once."""
    rng = random.Random(seed)
    replicas = [
        RedisLeaseStore(open_redis_client(redis_url, timeout=RAW_STORE_TIMEOUT), namespace) for _ in range(2)
    ]
    cands = [stage(i) for i in range(3)]
    keep_on = {c.stage_arn for c in cands}
    # Every viewer asks once; a third of them ask again (through either replica) while the storm goes on.
    requests = [f"viewer-{i}" for i in range(viewers)]
    requests += rng.sample(requests, viewers // 3)
    rng.shuffle(requests)

    async def ask(user: str) -> tuple[str, str | None, bool]:
        result = await rng.choice(replicas).assign(ROOM, user, cands, keep_on, soft, hard, LEASE, T0)
        return user, (result.lease.stage_arn if result else None), bool(result and result.sticky)

    try:
        results = await asyncio.gather(*(ask(user) for user in requests))
        counts = [await replica.counts(ROOM, T0) for replica in replicas]
        holders: dict[str, set[str | None]] = {}
        for user, arn, _ in results:
            holders.setdefault(user, set()).add(arn)
        placed = {user: next(iter(arns)) for user, arns in holders.items() if arns != {None}}
        refused = {user for user, arns in holders.items() if None in arns}
        # A refused viewer changed nothing: it holds no lease, and nobody who was placed was ever refused.
        assert not refused & placed.keys()
        assert all(len(arns) == 1 for arns in holders.values()), "a repeated viewer kept its Stage"
        for user in refused:
            assert await replicas[0].renew(ROOM, user, LEASE, T0) is None
        assert counts[0] == counts[1] == dict(Counter(placed.values()))
        assert sum(counts[0].values()) == len(placed) == min(viewers, 3 * hard)
        assert max(counts[0].values()) <= hard
        if not refused:
            assert max(counts[0].values()) - min(counts[0].values()) <= 1, counts[0]
        else:
            assert all(n == hard for n in counts[0].values())
        asked = Counter(requests)
        assert sum(sticky for _, _, sticky in results) == sum(asked[user] - 1 for user in placed)
        assert await replicas[1].joins() == {ROOM: len(placed)}
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_replica_sees_what_the_other_expired_and_reap_reports_it_once(
    redis_url: str, namespace: str
) -> None:
    one, other = (
        RedisLeaseStore(open_redis_client(redis_url, timeout=RAW_STORE_TIMEOUT), namespace) for _ in range(2)
    )
    a = stage(0)
    try:
        assert await one.assign(ROOM, "u1", [a], {a.stage_arn}, 1, 1, LEASE, T0) is not None
        assert await other.assign(ROOM, "u2", [a], {a.stage_arn}, 1, 1, LEASE, T0 + 1) is None
        later = T0 + LEASE
        placed = await other.assign(ROOM, "u2", [a], {a.stage_arn}, 1, 1, LEASE, later)
        assert placed is not None and placed.lease.stage_arn == a.stage_arn
        reaped = await one.reap(later) + await other.reap(later)
        assert [(lease.user_id, lease.expires_at) for lease in reaped] == [("u1", T0 + LEASE)]
        assert await one.rooms_counts(later) == {ROOM: {a.stage_arn: 1}}
    finally:
        await one.close()
        await other.close()


def redis_env(redis_url: str, namespace: str) -> dict[str, str]:
    return {"FANOUT_STORE": "redis", "FANOUT_REDIS_URL": redis_url, "FANOUT_CLUSTER_ID": namespace}


async def join(http: aiohttp.ClientSession, system: System, user: str) -> dict:
    async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user}) as response:
        assert response.status == 200, await response.text()
        body: dict = await response.json()
        return body


async def test_a_restarted_allocator_keeps_every_lease(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """DESIGN §11: kill the allocator mid-storm, start a new one: no lease lost, stickiness intact."""
    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="3", **redis_env(redis_url, namespace)) as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        users = [f"viewer-{i}" for i in range(60)]
        placed = {
            body["userId"]: body["stageArn"]
            for body in await asyncio.gather(*(join(http, system, u) for u in users))
        }
        before = await room_info(http, system)
        assert before["viewers"] == 60 and len(set(placed.values())) == 3

        await system.allocator_service.stop(0)
        system.allocator_service = await start_allocator_for(
            system.env, system.stagemanager_service.port, CollectorRegistry()
        )
        await wait_until_serving(system.allocator_service.port)

        for user, arn in placed.items():
            async with http.post(
                f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": user}
            ) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["stageArn"] == arn
        after = await room_info(http, system)
        again = [await join(http, system, user) for user in users[:10]]
    assert after["viewers"] == 60
    assert {s["stageArn"]: s["viewers"] for s in after["stages"]} == {
        s["stageArn"]: s["viewers"] for s in before["stages"]
    }
    assert [body["stageArn"] for body in again] == [placed[user] for user in users[:10]]


async def test_two_allocators_at_once_share_one_occupancy(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    async with (
        running_system(tmp_path, FANOUT_MIN_STAGES="2", **redis_env(redis_url, namespace)) as system,
        aiohttp.ClientSession() as http,
    ):
        await start_show(http, system)
        second = await start_allocator_for(
            {**system.env, "FANOUT_ALLOCATOR_LISTEN": "127.0.0.1:0"}, system.stagemanager_service.port
        )
        try:
            await wait_until_serving(second.port)
            direct = allocator_pb2_grpc.AllocatorStub(system.channel(f"127.0.0.1:{second.port}"))
            through_gateway = asyncio.gather(*(join(http, system, f"web-{i}") for i in range(20)))
            through_second = asyncio.gather(
                *(
                    direct.AssignViewer(allocator_pb2.AssignViewerRequest(room="main", user_id=f"grpc-{i}"))
                    for i in range(20)
                )
            )
            await asyncio.gather(through_gateway, through_second)
            # A viewer placed by one replica is sticky on the other.
            sticky = await direct.AssignViewer(
                allocator_pb2.AssignViewerRequest(room="main", user_id="web-0")
            )
            assert sticky.sticky

            async def occupancy(stub: allocator_pb2_grpc.AllocatorStub) -> tuple[dict[str, int], int, int]:
                response = await stub.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))
                (room,) = response.rooms
                return {s.stage_arn: s.leased for s in response.stages}, room.viewers, room.joins_total

            first_view, second_view = await occupancy(system.allocator), await occupancy(direct)
        finally:
            await second.stop(0)
    assert first_view == second_view
    stages, viewers, joins = first_view
    assert viewers == 40 == joins and sorted(stages.values()) == [20, 20]


async def test_an_allocator_without_its_redis_does_not_serve(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    env = {**system.env, **redis_env(unreachable, unique_namespace())}
    alone = await start_allocator_for(
        {**env, "FANOUT_ALLOCATOR_LISTEN": "127.0.0.1:0"}, system.stagemanager_service.port
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{alone.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # The inventory snapshot arrives at once; then Redis is asked (and retried) several times.
            await asyncio.sleep(1.5)
            response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    finally:
        await alone.stop(0)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    outage = [r for r in caplog.records if "Redis lease store unreachable" in r.getMessage()]
    assert len(outage) == 1, "one log line per outage, not one per retry"
