"""Two stage manager replicas on Redis: one leads, the other follows and takes over (issue: HA).

Real processes: both stage managers run as `python -m services.stagemanager`, the leader is killed with
-9 or frozen with SIGSTOP; the emulator enforces IVS's call rates; the allocator (on Redis) watches the
follower, as a Service would route it, while viewers join and the pool grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as redis

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc, stagemanager_pb2_grpc
from protos.fanout.v1 import stagemanager_pb2 as pb
from services.allocator.server import AllocatorService
from services.ivslocal.config import Settings as IvsSettings
from tests.integration.fault_proxy import FaultProxy, fault_proxy
from tests.integration.ivslocal_fixtures import IvsLocalServer, running_ivslocal
from tests.integration.system import free_port, service_env, start_allocator_for, wait_until_serving
from tests.integration.test_stagemanager_restarts import StageManagerProcess
from tests.integration.waiting import eventually
from tests.redis_server import RedisServer

CLUSTER = "ha"
LEASE_SECONDS = 4.0
# A follower leads within the lease's TTL (the dead leader's key expires) plus one campaign interval
# (TTL / 3) plus its takeover (replay from Redis, one ListStages pass): stated for a loaded machine.
TAKEOVER_BOUND_SECONDS = LEASE_SECONDS + LEASE_SECONDS / 3 + 6.0


class Replica(StageManagerProcess):
    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)


@dataclass
class Pair:
    ivs: IvsLocalServer
    redis: redis.Redis
    first: Replica
    second: Replica
    allocator_service: AllocatorService
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.channels.append(channel)
        return channel

    def rooms(self, replica: Replica) -> stagemanager_pb2_grpc.StageManagerStub:
        return stagemanager_pb2_grpc.StageManagerStub(self._channel(replica.address))

    @property
    def allocator(self) -> allocator_pb2_grpc.AllocatorStub:
        return allocator_pb2_grpc.AllocatorStub(self._channel(f"127.0.0.1:{self.allocator_service.port}"))

    async def leader_address(self) -> str:
        raw = await self.redis.get(f"fanout:{CLUSTER}:stagemanager:leader")
        return str(json.loads(raw)["address"]) if raw else ""

    def ivs_stages(self) -> dict[str, dict[str, str]]:
        """This cluster's Stages as IVS has them (the emulator's own state: no call budget spent)."""
        stages: dict[str, dict[str, str]] = {}
        token = None
        while True:
            page = self.ivs.state.list_stages(next_token=token, max_results=100)
            stages.update(
                {s.arn: dict(s.tags) for s in page.items if s.tags.get("fanout:cluster") == CLUSTER}
            )
            token = page.next_token
            if not token:
                return stages


@contextlib.asynccontextmanager
async def running_pair(
    tmp_path: Path, redis_server: RedisServer, first_ivs: FaultProxy | None = None
) -> AsyncIterator[Pair]:
    """Two stage managers (the first leads), the allocator watching the second."""
    async with running_ivslocal(IvsSettings(port=0, rate_limits=True)) as ivs:
        base = service_env(
            ivs.url,
            tmp_path,
            {
                "FANOUT_CLUSTER_ID": CLUSTER,
                "FANOUT_STAGEMANAGER_STORE": "redis",
                "FANOUT_STORE": "redis",
                "FANOUT_REDIS_URL": redis_server.url,
                "FANOUT_LEADER_LEASE_SECONDS": str(LEASE_SECONDS),
                "FANOUT_STAGE_CAPACITY": "4",
                "FANOUT_MIN_FREE_SLOTS": "4",
                "FANOUT_AUTOSCALER_TICK_SECONDS": "0.2",
                "FANOUT_LOG_JSON": "false",
            },
        )
        first_env = dict(base)
        if first_ivs is not None:
            first_ivs.target_port = int(ivs.url.rsplit(":", 1)[1])
            first_env["FANOUT_IVS_ENDPOINT"] = first_ivs.url
        first = _replica(first_env, tmp_path / "first.log")
        second = _replica(base, tmp_path / "second.log")
        client = redis.Redis.from_url(redis_server.url)
        allocator = None
        try:
            first.start()
            pair_probe = Pair(ivs, client, first, second, None)  # type: ignore[arg-type]
            await eventually(
                lambda: _equals(pair_probe.leader_address(), first.address),
                what="the first to lead",
                within=30,
            )
            second.start()
            second_port = int(second.address.rsplit(":", 1)[1])
            await wait_until_serving(second_port)
            allocator = await start_allocator_for(base, second_port)
            await wait_until_serving(allocator.port)
            pair = Pair(ivs, client, first, second, allocator)
            try:
                yield pair
            finally:
                for channel in pair.channels:
                    await channel.close()
        finally:
            if allocator is not None:
                await allocator.stop(0)
            for replica in (first, second):
                with contextlib.suppress(ProcessLookupError, AssertionError):
                    replica.resume()
                replica.stop()
            await client.aclose()


def _replica(env: Mapping[str, str], log_path: Path) -> Replica:
    address = f"127.0.0.1:{free_port()}"
    return Replica(
        {**env, "FANOUT_STAGEMANAGER_LISTEN": address, "FANOUT_STAGEMANAGER_ADVERTISE_ADDR": address},
        log_path,
    )


async def _equals(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]


class Audience:
    """Viewers joining through the allocator, all the time, as in a show; outcomes counted."""

    def __init__(self, allocator: allocator_pb2_grpc.AllocatorStub) -> None:
        self.outcomes: Counter[str] = Counter()
        self.placed: dict[str, str] = {}
        self._allocator = allocator
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            user = f"viewer-{n}"
            try:
                answer = await self._allocator.AssignViewer(
                    allocator_pb2.AssignViewerRequest(room="main", user_id=user), timeout=5
                )
                self.placed[user] = answer.token.stage_arn
                self.outcomes["placed"] += 1
                n += 1
            except grpc.aio.AioRpcError as error:
                self.outcomes[error.code().name] += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def start_show(pair: Pair) -> None:
    """The room exists and its broadcaster publishes; every call through the follower (forwarded)."""
    follower = pair.rooms(pair.second)
    room = (await follower.EnsureRoom(pb.EnsureRoomRequest(room="main"), timeout=30)).room
    for stage in room.stages:
        await follower.ReportPublisherStatus(
            pb.ReportPublisherStatusRequest(room="main", stage_arn=stage.arn, publishing=True), timeout=10
        )


async def stage_count(pair: Pair) -> int:
    room = (await pair.rooms(pair.second).GetRoom(pb.GetRoomRequest(room="main"), timeout=5)).room
    return sum(1 for stage in room.stages if stage.arn)


async def test_the_follower_takes_over_a_killed_leader_while_viewers_join(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    async with running_pair(tmp_path, private_redis) as pair:
        await start_show(pair)
        audience = Audience(pair.allocator)
        await eventually(lambda: _at_least(stage_count(pair), 3), what="the pool growing", within=30)

        # Up to here the first led all along: it made the pool the follower reads from Redis.
        assert await pair.leader_address() == pair.first.address and pair.first.exit_code() is None
        pair.first.kill9()
        killed_at = time.monotonic()
        await eventually(
            lambda: _equals(pair.leader_address(), pair.second.address),
            what="the follower leading",
            within=TAKEOVER_BOUND_SECONDS,
        )
        took_over = time.monotonic() - killed_at
        placed_then, stages_then = audience.outcomes["placed"], len(pair.ivs_stages())
        # Joins keep being placed, and the pool keeps growing under the new leader (counted in IVS: its
        # inventory may still be catching up with what the old leader did).
        await eventually(
            lambda: len(pair.ivs_stages()) >= stages_then + 2,
            what="the new leader growing the pool",
            within=30,
        )
        await eventually(lambda: audience.outcomes["placed"] >= placed_then + 20, what="more joins placed")
        await audience.stop()

        # Nothing orphaned or duplicated: IVS holds exactly the Stages the leader knows, one per index
        # (once the last CreateStage the audience asked for has landed in both).
        await eventually(lambda: _agree(pair), what="IVS and the leader's inventory to agree", within=15)
        in_ivs = pair.ivs_stages()
        indices = Counter(tags["fanout:index"] for tags in in_ivs.values())
        assert all(count == 1 for count in indices.values()), indices
        # Nothing deleted under viewers: every placed viewer's Stage still exists.
        assert set(audience.placed.values()) <= set(in_ivs)
        # Callers saw only the waits a takeover implies, never an error.
        assert set(audience.outcomes) <= {"placed", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, audience.outcomes
        assert took_over < TAKEOVER_BOUND_SECONDS


async def test_a_leader_frozen_past_its_lease_makes_no_ivs_call_when_it_wakes(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    async with fault_proxy() as first_ivs, running_pair(tmp_path, private_redis, first_ivs=first_ivs) as pair:
        await start_show(pair)
        audience = Audience(pair.allocator)
        await eventually(lambda: _at_least(stage_count(pair), 2), what="the pool growing", within=30)
        assert any("CreateStage" in request for request in first_ivs.requests)  # it did lead, through here

        assert await pair.leader_address() == pair.first.address and pair.first.exit_code() is None
        pair.first.pause()
        await eventually(
            lambda: _equals(pair.leader_address(), pair.second.address),
            what="the follower leading",
            within=TAKEOVER_BOUND_SECONDS,
        )
        # The audience keeps growing meanwhile: the frozen leader wakes to a room that wants Stages.
        # Counted in IVS, where only the new leader can add one now (the follower's copy of the
        # inventory may still be catching up with what the old leader did before it froze).
        grown = len(pair.ivs_stages())
        await eventually(lambda: len(pair.ivs_stages()) > grown, what="the new leader acting", within=30)
        before_wake = len(first_ivs.requests)
        pair.first.resume()
        await eventually(lambda: pair.first.exit_code() is not None, what="the old leader ending", within=15)
        await audience.stop()

        assert first_ivs.requests[before_wake:] == [], first_ivs.requests[before_wake:]
        assert pair.first.exit_code() == 3, pair.first.log()[-2000:]
        await eventually(lambda: _agree(pair), what="IVS and the leader's inventory to agree", within=15)


async def _at_least(value: object, expected: int) -> bool:
    return await value >= expected  # type: ignore[misc, operator]


async def _agree(pair: Pair) -> bool:
    room = (await pair.rooms(pair.second).GetRoom(pb.GetRoomRequest(room="main"), timeout=5)).room
    return set(pair.ivs_stages()) == {stage.arn for stage in room.stages if stage.arn}
