"""The stage manager against the IVS emulator over HTTP: rooms, tags, states, WatchRoom, recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from protos.fanout.v1 import common_pb2, stagemanager_pb2, stagemanager_pb2_grpc
from services.ivslocal.config import Settings as IvsSettings
from tests.integration.ivslocal_fixtures import running_ivslocal
from tests.integration.system import service_env, start_stagemanager
from tests.integration.waiting import eventually

pb = stagemanager_pb2


def cluster_stages(ivs: object, cluster: str) -> list[dict[str, object]]:
    client = ivs.boto3_client()  # type: ignore[attr-defined]
    stages, token = [], None
    while True:
        page = client.list_stages(maxResults=100, **({"nextToken": token} if token else {}))
        stages += [s for s in page["stages"] if s.get("tags", {}).get("fanout:cluster") == cluster]
        token = page.get("nextToken")
        if not token:
            return stages


async def test_ensure_room_creates_tagged_stages_once(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "3"}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                first = await stub.EnsureRoom(pb.EnsureRoomRequest(room="show-1"))
                again = await stub.EnsureRoom(pb.EnsureRoomRequest(room="show-1"))
        finally:
            await service.stop(0)
        assert first.created and not again.created
        assert [s.index for s in first.room.stages] == [0, 1, 2]
        assert all(s.state == common_pb2.STAGE_STATE_STANDBY for s in first.room.stages)
        assert [s.arn for s in again.room.stages] == [s.arn for s in first.room.stages]
        assert all(s.events_url.startswith("ws://") and s.whip_url for s in first.room.stages)
        in_ivs = await asyncio.to_thread(cluster_stages, ivs, "test")
        assert sorted(str(s["arn"]) for s in in_ivs) == sorted(s.arn for s in first.room.stages)
        tags = [s["tags"] for s in in_ivs]
        assert all(t["fanout:room"] == "show-1" and t["fanout:role"] == "origin" for t in tags)  # type: ignore[index]
        assert sorted(t["fanout:index"] for t in tags) == ["0", "1", "2"]  # type: ignore[index]


async def test_publisher_status_moves_stages_between_standby_and_live(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "2"}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                room = (await stub.EnsureRoom(pb.EnsureRoomRequest(room="main"))).room
                arn = room.stages[1].arn
                live = await stub.ReportPublisherStatus(
                    pb.ReportPublisherStatusRequest(room="main", stage_arn=arn, publishing=True)
                )
                during = (await stub.GetRoom(pb.GetRoomRequest(room="main"))).room
                await stub.ReportPublisherStatus(
                    pb.ReportPublisherStatusRequest(room="main", stage_arn=arn, publishing=False)
                )
                after = (await stub.GetRoom(pb.GetRoomRequest(room="main"))).room
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.ReportPublisherStatus(
                        pb.ReportPublisherStatusRequest(
                            room="main",
                            stage_arn="arn:aws:ivs:us-east-1:123456789012:stage/nope",
                            publishing=True,
                        )
                    )
                with pytest.raises(grpc.aio.AioRpcError) as bad_room:
                    await stub.GetRoom(pb.GetRoomRequest(room="Not A Room"))
        finally:
            await service.stop(0)
        assert live.stage.state == common_pb2.STAGE_STATE_LIVE
        assert during.publishing
        assert [s.state for s in during.stages] == [
            common_pb2.STAGE_STATE_STANDBY,
            common_pb2.STAGE_STATE_LIVE,
        ]
        assert not after.publishing
        assert all(s.state == common_pb2.STAGE_STATE_STANDBY for s in after.stages)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(unknown.value.trailing_metadata())["fanout-error-code"] == "stage_not_found"
        assert bad_room.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_room_sends_snapshot_then_changes_in_order(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                existing = (await stub.EnsureRoom(pb.EnsureRoomRequest(room="before"))).room
                call = stub.WatchRoom(pb.WatchRoomRequest())
                snapshot = await call.read()
                await stub.EnsureRoom(pb.EnsureRoomRequest(room="after"))
                await stub.EndRoom(pb.EndRoomRequest(room="before"))
                events = []
                while not events or events[-1].WhichOneof("event") != "room_ended":
                    events.append(await asyncio.wait_for(call.read(), 10))
                call.cancel()
        finally:
            await service.stop(0)
        assert snapshot.WhichOneof("event") == "snapshot"
        assert [r.room for r in snapshot.snapshot.rooms] == ["before"]
        assert snapshot.snapshot.rooms[0].stages[0].arn == existing.stages[0].arn
        revisions = [e.revision for e in events]
        assert revisions == sorted(revisions) and revisions[0] > snapshot.revision
        kinds = [(e.WhichOneof("event"), getattr(e, e.WhichOneof("event")).room) for e in events]
        assert ("stage_added", "after") in kinds
        added = next(e.stage_added for e in events if e.WhichOneof("event") == "stage_added")
        assert added.state == common_pb2.STAGE_STATE_PROVISIONING
        created = [e.stage_changed for e in events if e.WhichOneof("event") == "stage_changed"]
        assert any(s.room == "after" and s.state == common_pb2.STAGE_STATE_STANDBY and s.arn for s in created)
        assert ("stage_removed", "before") in kinds
        assert kinds[-1] == ("room_ended", "before")


async def test_end_room_deletes_its_stages_in_ivs(tmp_path: Path) -> None:
    async with running_ivslocal() as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "2"}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                await stub.EnsureRoom(pb.EnsureRoomRequest(room="gone"))
                await stub.EnsureRoom(pb.EnsureRoomRequest(room="stays"))
                await stub.EndRoom(pb.EndRoomRequest(room="gone"))

                async def room_gone() -> bool:
                    try:
                        await stub.GetRoom(pb.GetRoomRequest(room="gone"))
                    except grpc.aio.AioRpcError as error:
                        return error.code() == grpc.StatusCode.NOT_FOUND
                    return False

                await eventually(room_gone, what="room to end")
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.EndRoom(pb.EndRoomRequest(room="gone"))
        finally:
            await service.stop(0)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        left = await asyncio.to_thread(cluster_stages, ivs, "test")
        assert sorted(s["tags"]["fanout:room"] for s in left) == ["stays", "stays"]  # type: ignore[index]


async def test_restart_recovers_inventory_without_duplicates_or_touching_other_clusters(
    tmp_path: Path,
) -> None:
    async with running_ivslocal() as ivs:
        client = ivs.boto3_client()
        foreign = await asyncio.to_thread(
            client.create_stage,
            name="someone-else",
            tags={
                "fanout:cluster": "other",
                "fanout:room": "main",
                "fanout:index": "0",
                "fanout:role": "origin",
            },
        )
        env = service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "2"})
        first = await start_stagemanager(env)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = stagemanager_pb2_grpc.StageManagerStub(channel)
            before = (await stub.EnsureRoom(pb.EnsureRoomRequest(room="main"))).room
            await stub.EnsureRoom(pb.EnsureRoomRequest(room="second"))
        await first.stop(0)

        second = await start_stagemanager(env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                rooms = (await stub.ListRooms(pb.ListRoomsRequest())).rooms
                again = await stub.EnsureRoom(pb.EnsureRoomRequest(room="main"))
                await stub.EndRoom(pb.EndRoomRequest(room="main"))
                await eventually(
                    lambda: not any(r.room == "main" for r in second.inventory.rooms()), what="main to end"
                )
        finally:
            await second.stop(0)
        assert sorted(r.room for r in rooms) == ["main", "second"]
        recovered = next(r for r in rooms if r.room == "main")
        assert [(s.index, s.arn) for s in recovered.stages] == [(s.index, s.arn) for s in before.stages]
        assert all(s.events_url for s in recovered.stages), "endpoints come back through GetStage"
        assert not again.created and len(again.room.stages) == 2
        ours = await asyncio.to_thread(cluster_stages, ivs, "test")
        assert len(ours) == 2, "only room 'second' is left, with no duplicate"
        theirs = await asyncio.to_thread(cluster_stages, ivs, "other")
        assert [s["arn"] for s in theirs] == [foreign["stage"]["arn"]]


async def test_stage_quota_is_reported_not_retried(tmp_path: Path) -> None:
    async with running_ivslocal(IvsSettings(port=0, stage_quota=1)) as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "3"}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                response = await stub.EnsureRoom(pb.EnsureRoomRequest(room="main"))
        finally:
            await service.stop(0)
        states = sorted(common_pb2.StageState.Name(s.state) for s in response.room.stages)
        assert states == ["STAGE_STATE_FAILED", "STAGE_STATE_FAILED", "STAGE_STATE_STANDBY"]
        assert "quota" in response.room.last_error
        assert ivs.stats.calls["CreateStage"] == 3, "each refused Stage was tried once, not in a loop"


async def test_stage_creation_stays_within_the_ivs_call_budget(tmp_path: Path) -> None:
    async with running_ivslocal(IvsSettings(port=0, rate_limits=True)) as ivs:
        service = await start_stagemanager(service_env(ivs.url, tmp_path, {"FANOUT_MIN_STAGES": "12"}))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
                stub = stagemanager_pb2_grpc.StageManagerStub(channel)
                response = await stub.EnsureRoom(pb.EnsureRoomRequest(room="main"))
        finally:
            await service.stop(0)
        assert len(response.room.stages) == 12
        assert all(s.state == common_pb2.STAGE_STATE_STANDBY for s in response.room.stages)
        assert ivs.stats.throttles["CreateStage"] == 0
