"""The stage manager killed (-9) and restarted as a real process: no lease lost, no Stage orphaned or
duplicated, no room revived, and no answer from a half-recovered inventory."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.fanout.v1 import allocator_pb2, allocator_pb2_grpc, common_pb2, stagemanager_pb2_grpc
from protos.fanout.v1 import stagemanager_pb2 as pb
from services.allocator.server import AllocatorService
from services.ivslocal.config import Settings as IvsSettings
from tests.integration.ivs_publisher import EmulatorPublisher
from tests.integration.ivslocal_fixtures import IvsLocalServer, running_ivslocal
from tests.integration.service_process import ServiceProcess
from tests.integration.system import free_port, service_env, start_allocator_for, wait_until_serving
from tests.integration.waiting import eventually
from tests.redis_server import RedisServer

CLUSTER = "restarts"


class StageManagerProcess(ServiceProcess):
    """`python -m services.stagemanager` on a fixed port, so it can be killed and started again there."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__("services.stagemanager", env, log_path)
        self.address = env["FANOUT_STAGEMANAGER_LISTEN"]


@dataclass
class Cluster:
    ivs: IvsLocalServer
    stagemanager: StageManagerProcess
    allocator_service: AllocatorService
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        self.channels.append(channel)
        return channel

    @property
    def rooms(self) -> stagemanager_pb2_grpc.StageManagerStub:
        return stagemanager_pb2_grpc.StageManagerStub(self._channel(self.stagemanager.address))

    @property
    def allocator(self) -> allocator_pb2_grpc.AllocatorStub:
        return allocator_pb2_grpc.AllocatorStub(self._channel(f"127.0.0.1:{self.allocator_service.port}"))

    def ivs_stages(self) -> list[dict]:
        """This cluster's Stages as IVS has them, read from the emulator's own state: polling through
        the API would spend the call budget the stage manager is recovering with."""
        stages: list[dict] = []
        token = None
        while True:
            page = self.ivs.state.list_stages(next_token=token, max_results=100)
            stages += [
                {"arn": s.arn, "tags": dict(s.tags)}
                for s in page.items
                if s.tags.get("fanout:cluster") == CLUSTER
            ]
            token = page.next_token
            if not token:
                return stages

    async def restart_stagemanager(self) -> None:
        self.stagemanager.kill9()
        self.stagemanager.start()


@contextlib.asynccontextmanager
async def running_cluster(tmp_path: Path, redis: RedisServer, **overrides: str) -> AsyncIterator[Cluster]:
    """The emulator with IVS's call rates (so recovery takes seconds), the stage manager as a child
    process, and an allocator on a private Redis."""
    async with running_ivslocal(IvsSettings(port=0, rate_limits=True)) as ivs:
        stagemanager_address = f"127.0.0.1:{free_port()}"
        env = service_env(
            ivs.url,
            tmp_path,
            {
                "FANOUT_CLUSTER_ID": CLUSTER,
                "FANOUT_STAGEMANAGER_LISTEN": stagemanager_address,
                "FANOUT_STORE": "redis",
                "FANOUT_REDIS_URL": redis.url,
                # The pool stays as made: any Stage that appears later is a duplicate or a revival.
                "FANOUT_MIN_FREE_SLOTS": "0",
                "FANOUT_STAGE_CAPACITY": "1000",
                "FANOUT_LOG_JSON": "false",
                **overrides,
            },
        )
        stagemanager = StageManagerProcess(env, tmp_path / "stagemanager.log")
        stagemanager.start()
        allocator = None
        try:
            await wait_until_serving(int(stagemanager_address.rsplit(":", 1)[1]))
            allocator = await start_allocator_for(env, int(stagemanager_address.rsplit(":", 1)[1]))
            await wait_until_serving(allocator.port)
            cluster = Cluster(ivs, stagemanager, allocator)
            try:
                yield cluster
            finally:
                for channel in cluster.channels:
                    await channel.close()
        finally:
            if allocator is not None:
                await allocator.stop(0)
            stagemanager.stop()


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


async def place(allocator: allocator_pb2_grpc.AllocatorStub, room: str, user: str) -> str:
    answer = await allocator.AssignViewer(
        allocator_pb2.AssignViewerRequest(room=room, user_id=user), timeout=5
    )
    return answer.token.stage_arn


async def test_a_killed_stage_manager_restarts_without_losing_a_lease_or_a_stage(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    rooms = ("main", "second", "third")
    async with running_cluster(tmp_path, private_redis, FANOUT_MIN_STAGES="4") as cluster:
        for room in rooms:
            await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room=room), timeout=30)
        stages_before = sorted(s["arn"] for s in cluster.ivs_stages())
        assert len(stages_before) == 12
        seats = {
            (room, f"{room}-v{i}"): await place(cluster.allocator, room, f"{room}-v{i}")
            for room in rooms
            for i in range(10)
        }

        # Viewers keep arriving and renewing through the whole restart, as they would in a show.
        outcomes: Counter[str] = Counter()
        joined: dict[tuple[str, str], str] = {}
        stop_load = asyncio.Event()

        async def audience() -> None:
            n = 0
            while not stop_load.is_set():
                room = rooms[n % len(rooms)]
                user = f"{room}-late{n}"
                try:
                    joined[(room, user)] = await place(cluster.allocator, room, user)
                    renewed = await cluster.allocator.RenewViewer(
                        allocator_pb2.RenewViewerRequest(room=room, user_id=f"{room}-v{n % 10}"), timeout=5
                    )
                    outcomes[
                        "ok" if renewed.stage_arn == seats[(room, f"{room}-v{n % 10}")] else "moved"
                    ] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes[error.code().name] += 1
                n += 1
                await asyncio.sleep(0.01)

        load = asyncio.create_task(audience())
        await eventually(lambda: outcomes["ok"] >= 5, what="the audience to get going")

        await cluster.restart_stagemanager()
        # While it recovers (12 GetStage calls within IVS's 5 calls/s), it never answers from a partial
        # inventory: not-found for a live room would send its viewers away.
        answers: Counter[str] = Counter()

        async def recovered_answer() -> bool:
            # Health first: once it says SERVING, recovery is over, so GetRoom must not say otherwise.
            said_serving = await serving(cluster.stagemanager.address)
            try:
                room = await cluster.rooms.GetRoom(pb.GetRoomRequest(room="third"), timeout=2)
            except grpc.aio.AioRpcError as error:
                answers[error.code().name] += 1
                answers["serving while recovering"] += said_serving
                return False
            answers["room"] += 1
            return len(room.room.stages) == 4

        await eventually(recovered_answer, what="the restarted stage manager to answer", within=60)
        assert await serving(cluster.stagemanager.address)
        assert answers["NOT_FOUND"] == 0, answers
        # Readiness says the same: a load balancer sends nothing to a stage manager still recovering.
        assert answers["serving while recovering"] == 0, answers
        assert answers["UNAVAILABLE"] > 0, "the restart was too quick to show anything; slow IVS down"

        # The allocator has the new inventory once it can issue a publisher token at its revision.
        ensured = await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room="main"), timeout=30)
        await cluster.allocator.IssuePublisherTokens(
            allocator_pb2.IssuePublisherTokensRequest(
                room="main", user_id="b", min_revision=ensured.revision
            ),
            timeout=10,
        )
        await eventually(lambda: outcomes["ok"] >= 20, what="viewers to keep renewing after the restart")
        stop_load.set()
        await load

        renewed = {
            key: (
                await cluster.allocator.RenewViewer(
                    allocator_pb2.RenewViewerRequest(room=key[0], user_id=key[1]), timeout=5
                )
            ).stage_arn
            for key in [*seats, *joined]
        }
        occupancy = await cluster.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(), timeout=5)
        listed = await cluster.rooms.ListRooms(pb.ListRoomsRequest(), timeout=5)
        stages_after = sorted(s["arn"] for s in cluster.ivs_stages())
        log = cluster.stagemanager.log()

    assert set(outcomes) == {"ok"}, f"every join and renewal during the restart succeeded: {outcomes}"
    assert renewed == {**seats, **joined}, "every lease survived, on the Stage it was on"
    assert sum(room.viewers for room in occupancy.rooms) == len(seats) + len(joined)
    assert stages_after == stages_before, "no Stage was orphaned, lost or added"
    known = sorted(stage.arn for room in listed.rooms for stage in room.stages)
    assert known == stages_before, "the stage manager knows each Stage exactly once"
    assert "recovered 12 Stage(s) in 3 room(s)" in log


async def test_a_room_being_ended_stays_ended_after_a_kill(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    async with running_cluster(tmp_path, private_redis, FANOUT_MIN_STAGES="10") as cluster:
        await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room="gone"), timeout=30)
        await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room="stays"), timeout=30)
        for i in range(20):
            await place(cluster.allocator, "gone", f"v{i}")
            await place(cluster.allocator, "stays", f"v{i}")
        created = cluster.ivs.stats.calls["CreateStage"]
        deleted = cluster.ivs.stats.calls["DeleteStage"]

        await cluster.rooms.EndRoom(pb.EndRoomRequest(room="gone"), timeout=30)
        # Killed mid-ending: deletions run at IVS's 5 calls/s, so most of the 10 Stages are still there.
        await eventually(
            lambda: cluster.ivs.stats.calls["DeleteStage"] >= deleted + 2,
            what="the first deletions",
            every=0.005,
        )
        await cluster.restart_stagemanager()
        left_at_kill = [s for s in cluster.ivs_stages() if s["tags"]["fanout:room"] == "gone"]

        def gone_from_ivs() -> bool:
            return not any(s["tags"]["fanout:room"] == "gone" for s in cluster.ivs_stages())

        await eventually(gone_from_ivs, what="the ending to finish after the restart", within=60)
        await eventually(lambda: serving(cluster.stagemanager.address), what="the stage manager to serve")
        listed = await cluster.rooms.ListRooms(pb.ListRoomsRequest(), timeout=5)

        async def leases_released() -> bool:
            occupancy = await cluster.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(), timeout=5)
            return {room.room: room.viewers for room in occupancy.rooms if room.viewers} == {"stays": 20}

        await eventually(leases_released, what="the ended room's leases to be released")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await place(cluster.allocator, "gone", "late")
        stays = [s for s in cluster.ivs_stages() if s["tags"]["fanout:room"] == "stays"]

    assert 0 < len(left_at_kill) < 10, "the kill landed mid-ending"
    assert [room.room for room in listed.rooms] == ["stays"]
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert cluster.ivs.stats.calls["CreateStage"] == created, "nothing revived the ended room"
    assert len(stays) == 10


async def test_a_restart_keeps_the_topology_and_its_replications(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """Roles and origins come back from the tags; the replications IVS still runs are found, not
    started twice, and the replicas are LIVE again once the origin's publisher is seen."""
    topology = {
        "FANOUT_DIRECT_STAGES": "1",
        "FANOUT_REPLICAS_PER_ORIGIN": "5",
        "FANOUT_MIN_STAGES": "6",
        "FANOUT_REPLICATION_CHECK_SECONDS": "1",
    }
    async with running_cluster(tmp_path, private_redis, **topology) as cluster:
        room = (await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room="main"), timeout=30)).room
        origin = next(s for s in room.stages if s.role == common_pb2.STAGE_ROLE_ORIGIN)
        token = (
            await cluster.allocator.IssuePublisherTokens(
                allocator_pb2.IssuePublisherTokensRequest(room="main", user_id="broadcaster"), timeout=10
            )
        ).tokens
        assert [t.token.stage_arn for t in token] == [origin.arn]  # only the origin is published to
        publisher = await EmulatorPublisher(
            {
                "stageArn": origin.arn,
                "token": token[0].token.token,
                "participantId": token[0].token.participant_id,
            }
        ).publish()
        await cluster.rooms.ReportPublisherStatus(
            pb.ReportPublisherStatusRequest(
                room="main", stage_arn=origin.arn, publishing=True, participant_id=publisher.participant_id
            ),
            timeout=10,
        )

        def replications() -> dict[str, tuple[str, int]]:
            """Destination -> (state, sequence number): a replication started again gets a new one."""
            source = cluster.ivs.state
            return {
                r.destination_stage_arn: (r.state, r.seq)
                for r in source.list_participant_replicas(origin.arn, publisher.participant_id).items
            }

        await eventually(lambda: len(replications()) == 5, what="five replications", within=15)
        before = {s["arn"]: s["tags"] for s in cluster.ivs_stages()}
        replicated = replications()
        assert {state for state, _ in replicated.values()} == {"ACTIVE"}

        await cluster.restart_stagemanager()
        await eventually(
            lambda: serving(cluster.stagemanager.address), what="the restarted stage manager", within=30
        )
        # What the monitor would report: the broadcaster still publishes on the origin.
        seen = common_pb2.StageObservation(room="main", stage_arn=origin.arn, publishers=1)
        seen.observed_at.GetCurrentTime()
        await cluster.rooms.ReportObservations(pb.ReportObservationsRequest(observations=[seen]), timeout=10)

        async def replicas_live() -> bool:
            room = (await cluster.rooms.GetRoom(pb.GetRoomRequest(room="main"), timeout=10)).room
            replicas = [s for s in room.stages if s.role == common_pb2.STAGE_ROLE_REPLICA]
            return len(replicas) == 5 and all(
                s.replication == common_pb2.REPLICATION_STATE_ACTIVE
                and s.state == common_pb2.STAGE_STATE_LIVE
                and s.origin_index == origin.index
                for s in replicas
            )

        await eventually(replicas_live, what="the replicas LIVE again under their origin", within=30)
        assert {s["arn"]: s["tags"] for s in cluster.ivs_stages()} == before  # nothing made or lost
        assert replications() == replicated  # the same five, never stopped nor started again
        await publisher.leave()
