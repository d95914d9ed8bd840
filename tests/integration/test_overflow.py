"""The overflow tier's lifecycle: a live room gets a low-latency channel (moto's `ivs` server over HTTP)
and a composition of its origin into it (the emulator), both gone when the room ends; a restarted stage
manager adopts them instead of making them again and deletes a channel whose room is gone; a FAILED
composition shows in the room's JSON; FANOUT_OVERFLOW=off makes none of it."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from moto.server import ThreadedMotoServer

from protos.fanout.v1 import allocator_pb2, common_pb2
from protos.fanout.v1 import stagemanager_pb2 as pb
from tests.integration.ivs_publisher import EmulatorPublisher
from tests.integration.system import System, running_system
from tests.integration.test_stagemanager_restarts import CLUSTER, running_cluster, serving
from tests.integration.test_topology import report_publishing
from tests.integration.test_viewers import room_info, start_show
from tests.integration.waiting import eventually
from tests.ports import free_port
from tests.redis_server import RedisServer

# An ACTIVE composition is checked this often, so a FAILED one shows within a second.
FAST = {"FANOUT_OVERFLOW": "auto", "FANOUT_OVERFLOW_CHECK_SECONDS": "0.5"}


@dataclass
class ChannelApi:
    endpoint: str
    client: Any

    async def channels(self, cluster: str) -> list[dict[str, Any]]:
        """The cluster's channels, described (GetChannel: summaries have no playback URL); one deleted
        between the list and its GetChannel is gone, not an error."""
        page = await asyncio.to_thread(self.client.list_channels, maxResults=100)
        described = []
        for summary in page["channels"]:
            if summary.get("tags", {}).get("fanout:cluster") != cluster:
                continue
            try:
                described.append(
                    (await asyncio.to_thread(self.client.get_channel, arn=summary["arn"]))["channel"]
                )
            except self.client.exceptions.ResourceNotFoundException:
                continue
        return described


@contextlib.contextmanager
def running_channel_api() -> Iterator[ChannelApi]:
    """moto's server on a free loopback port: the `ivs` channel API over HTTP, emptied first (moto keeps
    its state per process)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        reset = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(reset, timeout=5):  # noqa: S310 - a loopback URL we built
            pass
        client = boto3.session.Session().client(
            "ivs",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        yield ChannelApi(endpoint, client)
    finally:
        server.stop()


async def compositions_on(system_ivs: Any, stage_arn: str) -> list[dict[str, Any]]:
    """The Stage's compositions, described, through boto3 against the emulator."""
    client = system_ivs.boto3_client()
    listed = await asyncio.to_thread(client.list_compositions, filterByStageArn=stage_arn)
    return [
        (await asyncio.to_thread(client.get_composition, arn=summary["arn"]))["composition"]
        for summary in listed["compositions"]
    ]


async def go_live(http: aiohttp.ClientSession, system: System) -> tuple[str, EmulatorPublisher]:
    """The broadcaster publishes on the room's origin for real and the page says so."""
    token = (await start_show(http, system))["tokens"][0]
    publisher = await EmulatorPublisher(token).publish()
    await report_publishing(http, system, publisher)
    return token["stageArn"], publisher


async def end_room(http: aiohttp.ClientSession, system: System) -> None:
    async with http.delete(
        f"{system.gateway_url}/api/rooms/main", headers=system.publisher_headers()
    ) as response:
        assert response.status == 204, await response.text()


async def test_a_live_room_gets_a_channel_and_a_composition_and_its_end_removes_both(tmp_path: Path) -> None:
    with running_channel_api() as channels:
        async with (
            running_system(tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, **FAST) as system,
            aiohttp.ClientSession() as http,
        ):
            origin, publisher = await go_live(http, system)

            async def active() -> list[dict[str, Any]] | None:
                running = [c for c in await compositions_on(system.ivs, origin) if c["state"] == "ACTIVE"]
                return running or None

            running = await eventually(active, what="an ACTIVE composition of the origin", within=15)
            made = await channels.channels("test")
            info = await eventually(
                lambda: _overflow_state(http, system, "ACTIVE"), what="the room to show it", within=10
            )
            encoder = await asyncio.to_thread(system.ivs.boto3_client().list_encoder_configurations)

            await end_room(http, system)

            async def gone() -> bool:
                return not await channels.channels("test") and all(
                    c["state"] in ("STOPPED", "STOPPING") for c in await compositions_on(system.ivs, origin)
                )

            await eventually(gone, what="the channel deleted and the composition stopped", within=20)
            stopped = await compositions_on(system.ivs, origin)
            await publisher.leave()

    assert len(running) == 1
    assert len(made) == 1
    channel = made[0]
    assert channel["latencyMode"] == "LOW"
    assert channel["tags"] == {"fanout:cluster": "test", "fanout:room": "main"}
    [destination] = running[0]["destinations"]
    assert destination["configuration"]["channel"]["channelArn"] == channel["arn"]
    assert running[0]["tags"] == {"fanout:cluster": "test", "fanout:room": "main"}
    [configuration] = encoder["encoderConfigurations"]
    assert configuration["tags"] == {"fanout:cluster": "test", "fanout:role": "overflow"}
    assert destination["configuration"]["channel"]["encoderConfigurationArn"] == configuration["arn"]
    # Locally the emulator serves the composition's HLS (moto's playback URLs lead nowhere).
    channel_id = channel["arn"].rsplit("/", 1)[-1]
    assert info["state"] == "ACTIVE" and info["error"] is None
    assert info["playbackUrl"].startswith("http://127.0.0.1:")
    assert info["playbackUrl"].endswith(f"/_playback/{channel_id}/index.m3u8")
    assert [c["arn"] for c in stopped] == [running[0]["arn"]]


async def _overflow_state(http: aiohttp.ClientSession, system: System, state: str) -> dict[str, Any] | None:
    overflow = (await room_info(http, system))["overflow"]
    return overflow if overflow and overflow["state"] == state else None


async def test_a_failed_composition_shows_in_the_room(tmp_path: Path) -> None:
    with running_channel_api() as channels:
        async with (
            running_system(tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, **FAST) as system,
            aiohttp.ClientSession() as http,
        ):
            origin, publisher = await go_live(http, system)
            await eventually(
                lambda: _overflow_state(http, system, "ACTIVE"), what="an ACTIVE overflow", within=15
            )
            [composition] = await compositions_on(system.ivs, origin)
            async with http.post(
                f"{system.ivs.url}/_emulator/compositions/fail", json={"arn": composition["arn"]}
            ) as response:
                assert response.status == 200, await response.text()
            failed = await eventually(
                lambda: _overflow_state(http, system, "FAILED"), what="the room to show FAILED", within=10
            )
            room = await system.stagemanager.GetRoom(pb.GetRoomRequest(room="main"), timeout=5)
            await publisher.leave()

    assert failed["playbackUrl"]
    assert room.room.overflow.state == common_pb2.OVERFLOW_STATE_FAILED
    assert room.room.overflow.composition_arn == composition["arn"]
    assert "failed" in room.room.overflow.error


async def test_overflow_off_makes_no_channel_and_no_composition(tmp_path: Path) -> None:
    with running_channel_api() as channels:
        async with (
            running_system(
                tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, FANOUT_OVERFLOW="off"
            ) as system,
            aiohttp.ClientSession() as http,
        ):
            _, publisher = await go_live(http, system)
            info = await room_info(http, system)
            await end_room(http, system)
            # With overflow on, the ending itself lists the origin's compositions before the Stages go.
            await eventually(
                lambda: system.ivs.stats.calls["DeleteStage"] >= 1,
                what="the room's Stages deleted",
                within=10,
            )
            await publisher.leave()
            calls = dict(system.ivs.stats.calls)
            made = await channels.channels("test")

    assert info["publishing"] is True
    assert info["overflow"] is None
    assert made == []
    assert not {"CreateEncoderConfiguration", "StartComposition", "ListCompositions"} & set(calls), calls


async def test_a_restart_adopts_the_channel_and_composition_and_deletes_an_orphan(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    with running_channel_api() as channels:
        async with running_cluster(
            tmp_path,
            private_redis,
            FANOUT_OVERFLOW="auto",
            FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint,
            FANOUT_OVERFLOW_CHECK_SECONDS="0.5",
        ) as cluster:
            room = (await cluster.rooms.EnsureRoom(pb.EnsureRoomRequest(room="main"), timeout=30)).room
            origin = room.stages[0]
            [token] = (
                await cluster.allocator.IssuePublisherTokens(
                    allocator_pb2.IssuePublisherTokensRequest(room="main", user_id="broadcaster"),
                    timeout=10,
                )
            ).tokens
            publisher = await EmulatorPublisher(
                {
                    "stageArn": origin.arn,
                    "token": token.token.token,
                    "participantId": token.token.participant_id,
                }
            ).publish()
            await cluster.rooms.ReportPublisherStatus(
                pb.ReportPublisherStatusRequest(
                    room="main",
                    stage_arn=origin.arn,
                    publishing=True,
                    participant_id=publisher.participant_id,
                ),
                timeout=10,
            )

            async def active_overflow() -> common_pb2.Overflow | None:
                got = (await cluster.rooms.GetRoom(pb.GetRoomRequest(room="main"), timeout=5)).room
                return got.overflow if got.overflow.state == common_pb2.OVERFLOW_STATE_ACTIVE else None

            before = await eventually(active_overflow, what="an ACTIVE overflow", within=20)
            channels_before = await channels.channels(CLUSTER)
            # A channel whose room is gone (its ending was cut short before the channel was deleted).
            orphan = await asyncio.to_thread(
                channels.client.create_channel,
                name=f"fanout-{CLUSTER}-gone",
                tags={"fanout:cluster": CLUSTER, "fanout:room": "gone"},
            )
            # Another deployment's channel in the same account: never touched.
            foreign = await asyncio.to_thread(
                channels.client.create_channel,
                name="fanout-other-main",
                tags={"fanout:cluster": "other", "fanout:room": "main"},
            )
            started = cluster.ivs.stats.calls["StartComposition"]

            await cluster.restart_stagemanager()
            await eventually(
                lambda: serving(cluster.stagemanager.address), what="the restarted stage manager", within=30
            )

            async def orphan_gone() -> bool:
                return [c["arn"] for c in await channels.channels(CLUSTER)] == [
                    c["arn"] for c in channels_before
                ]

            await eventually(orphan_gone, what="the orphan channel deleted", within=30)
            after = await eventually(active_overflow, what="the overflow adopted", within=30)
            # The broadcaster is still there (what the monitor would report): nothing new is started.
            seen = common_pb2.StageObservation(room="main", stage_arn=origin.arn, publishers=1)
            seen.observed_at.GetCurrentTime()
            await cluster.rooms.ReportObservations(
                pb.ReportObservationsRequest(observations=[seen]), timeout=10
            )
            await eventually(
                lambda: _origin_live(cluster), what="the origin LIVE again after the restart", within=10
            )
            compositions = [
                c
                for c in await compositions_on(cluster.ivs, origin.arn)
                if c["state"] in ("STARTING", "ACTIVE")
            ]
            foreign_left = await asyncio.to_thread(channels.client.get_channel, arn=foreign["channel"]["arn"])
            log = cluster.stagemanager.log()
            await publisher.leave()

    assert len(channels_before) == 1
    assert orphan["channel"]["arn"] not in {c["arn"] for c in channels_before}
    assert after.composition_arn == before.composition_arn
    assert after.channel_arn == before.channel_arn == channels_before[0]["arn"]
    assert after.playback_url == before.playback_url
    assert [c["arn"] for c in compositions] == [before.composition_arn], "no second composition"
    assert cluster.ivs.stats.calls["StartComposition"] == started, "nothing started again"
    assert foreign_left["channel"]["tags"]["fanout:cluster"] == "other"
    assert "overflow recovered: 1 composition(s) adopted, 1 channel(s) deleted" in log


async def _origin_live(cluster: Any) -> bool:
    room = (await cluster.rooms.GetRoom(pb.GetRoomRequest(room="main"), timeout=5)).room
    return room.stages[0].state == common_pb2.STAGE_STATE_LIVE


# One origin of two seats: the real-time ceiling is 2 viewers, so the 3rd and later get the overflow tier.
TWO_SEATS = {
    **FAST,
    "FANOUT_DIRECT_STAGES": "1",
    "FANOUT_REPLICAS_PER_ORIGIN": "0",
    "FANOUT_STAGE_CAPACITY": "2",
    "FANOUT_STAGE_HARD_LIMIT": "2",
    "FANOUT_MIN_STAGES": "1",
}


async def ask_token(http: aiohttp.ClientSession, system: System, user_id: str) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{system.gateway_url}/api/token/viewer", json={"room": "main", "userId": user_id}
    ) as response:
        return response.status, await response.json()


async def viewer_call(http: aiohttp.ClientSession, system: System, path: str, user_id: str) -> dict[str, Any]:
    async with http.post(f"{system.gateway_url}{path}", json={"room": "main", "userId": user_id}) as response:
        assert response.status in (200, 204), await response.text()
        return await response.json() if response.status == 200 else {}


async def test_viewers_past_the_ceiling_get_the_overflow_tier_instead_of_a_refusal(tmp_path: Path) -> None:
    with running_channel_api() as channels:
        async with (
            running_system(tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, **TWO_SEATS) as system,
            aiohttp.ClientSession() as http,
        ):
            _, publisher = await go_live(http, system)
            overflow = await eventually(
                lambda: _overflow_state(http, system, "ACTIVE"), what="an ACTIVE overflow", within=15
            )
            answers = {}
            for user in ("v1", "v2", "v3", "v4"):
                status, answers[user] = await ask_token(http, system, user)
                assert status == 200, answers[user]
            by_tier = (await room_info(http, system))["viewersByTier"]
            # The same overflow viewer asking again keeps its seat (sticky) and is not counted twice.
            status, again = await ask_token(http, system, "v3")
            assert status == 200 and again["tier"] == "overflow", again
            heartbeat = await viewer_call(http, system, "/api/viewer/heartbeat", "v4")
            occupancy = await system.allocator.GetOccupancy(allocator_pb2.GetOccupancyRequest(room="main"))

            # A real-time viewer leaves: overflow heartbeats say a seat is free, and an overflow viewer
            # who asks again gets it.
            await viewer_call(http, system, "/api/viewer/leave", "v1")
            offered = await viewer_call(http, system, "/api/viewer/heartbeat", "v4")
            status, promoted = await ask_token(http, system, "v3")
            taken = await viewer_call(http, system, "/api/viewer/heartbeat", "v4")
            after_promotion = (await room_info(http, system))["viewersByTier"]
            await viewer_call(http, system, "/api/viewer/leave", "v4")
            after_leave = (await room_info(http, system))["viewersByTier"]

            # The room ends: every seat of both tiers ends with it (a heartbeat finds no lease).
            status, late = await ask_token(http, system, "v5")
            assert status == 200 and late["tier"] == "overflow", late
            await end_room(http, system)

            async def lease_gone(user: str) -> bool:
                async with http.post(
                    f"{system.gateway_url}/api/viewer/heartbeat", json={"room": "main", "userId": user}
                ) as response:
                    body = await response.json()
                    return response.status == 404 and body["error"]["code"] == "lease_not_found"

            for user in ("v2", "v5"):
                await eventually(lambda user=user: lease_gone(user), what=f"{user}'s lease to end", within=10)
            await publisher.leave()

    assert [answers[user]["tier"] for user in ("v1", "v2")] == ["realtime", "realtime"]
    assert all(answers[user]["token"] and answers[user]["stageArn"] for user in ("v1", "v2"))
    for user in ("v3", "v4"):
        assert answers[user] == {
            "room": "main",
            "userId": user,
            "tier": "overflow",
            "playbackUrl": overflow["playbackUrl"],
            "leaseSeconds": answers["v1"]["leaseSeconds"],
        }
    assert by_tier == {"realtime": 2, "overflow": 2}
    lease = answers["v4"]["leaseSeconds"]
    full = {"leaseSeconds": lease, "stageArn": None, "tier": "overflow", "realtimeAvailable": False}
    assert heartbeat == full
    assert offered == {**full, "realtimeAvailable": True}
    assert taken == full
    [room] = occupancy.rooms
    assert (room.viewers, room.overflow_viewers) == (2, 2)
    assert status == 200 and promoted["tier"] == "realtime" and promoted["stageArn"], promoted
    assert after_promotion == {"realtime": 2, "overflow": 1}
    assert after_leave == {"realtime": 2, "overflow": 0}


async def test_with_overflow_off_a_viewer_past_the_ceiling_is_refused(tmp_path: Path) -> None:
    async with (
        running_system(tmp_path, **{**TWO_SEATS, "FANOUT_OVERFLOW": "off"}) as system,
        aiohttp.ClientSession() as http,
    ):
        _, publisher = await go_live(http, system)
        statuses = [(await ask_token(http, system, user))[0] for user in ("v1", "v2")]
        status, refused = await ask_token(http, system, "v3")
        info = await room_info(http, system)
        await publisher.leave()

    assert statuses == [200, 200]
    assert status == 503 and refused["error"]["code"] == "capacity_exhausted", refused
    assert "FANOUT_REPLICAS_PER_ORIGIN" in refused["error"]["message"]
    assert info["overflow"] is None and info["viewersByTier"] == {"realtime": 2, "overflow": 0}


async def test_with_start_at_the_tier_follows_demand_and_goes_when_idle(tmp_path: Path) -> None:
    """FANOUT_OVERFLOW_START_AT=0.5 of a 2-viewer ceiling: the first viewer brings the tier; once
    nobody needs it for FANOUT_OVERFLOW_IDLE_SECONDS, its composition stops and its channel goes."""
    settings = {**TWO_SEATS, "FANOUT_OVERFLOW_START_AT": "0.5", "FANOUT_OVERFLOW_IDLE_SECONDS": "2"}
    with running_channel_api() as channels:
        async with (
            running_system(tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, **settings) as system,
            aiohttp.ClientSession() as http,
        ):
            origin, publisher = await go_live(http, system)
            live = await room_info(http, system)
            before = await channels.channels("test")

            status, _ = await ask_token(http, system, "v1")
            assert status == 200
            first = await eventually(
                lambda: _overflow_state(http, system, "ACTIVE"), what="the tier started on demand", within=15
            )
            made = await channels.channels("test")

            await viewer_call(http, system, "/api/viewer/leave", "v1")

            async def removed() -> bool:
                info = await room_info(http, system)
                return info["overflow"] is None and not await channels.channels("test")

            await eventually(removed, what="the idle tier's channel deleted", within=30)
            compositions = await compositions_on(system.ivs, origin)

            status, _ = await ask_token(http, system, "v2")
            again = await eventually(
                lambda: _overflow_state(http, system, "ACTIVE"), what="the tier back on demand", within=15
            )
            await publisher.leave()

    assert live["overflow"] is None and before == []
    assert [c["arn"] for c in made] and first["playbackUrl"]
    assert all(c["state"] in ("STOPPING", "STOPPED") for c in compositions), compositions
    assert status == 200 and again["playbackUrl"] and again["playbackUrl"] != first["playbackUrl"]
