"""One broadcaster, one origin, five replicas: the room grows to exactly the topology, replicas are LIVE
only while IVS replicates the broadcaster into them, and the page publishes to one Stage (DESIGN.md §5).

Real processes and calls throughout: the emulator replicates a participant that really publishes over
its events socket, the stage manager starts the replications through boto3, viewers come through the
gateway's HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from protos.fanout.v1 import stagemanager_pb2
from tests.integration.ivs_publisher import EmulatorPublisher
from tests.integration.system import System, running_system
from tests.integration.test_viewers import room_info, start_show
from tests.integration.waiting import eventually
from tools.sse_client import read_events

SOFT, HARD = 2, 3
TOPOLOGY = {
    "FANOUT_DIRECT_STAGES": "1",
    "FANOUT_REPLICAS_PER_ORIGIN": "5",
    "FANOUT_STAGE_CAPACITY": str(SOFT),
    "FANOUT_STAGE_HARD_LIMIT": str(HARD),
    "FANOUT_MIN_FREE_SLOTS": "1",
    "FANOUT_AUTOSCALER_TICK_SECONDS": "0.2",
    "FANOUT_REPLICATION_CHECK_SECONDS": "1",
}
# How long a new participant id may leave the replicas unrepaired: one check interval plus the calls.
REPAIR_BOUND_SECONDS = 10.0


async def report_publishing(
    http: aiohttp.ClientSession,
    system: System,
    publisher: EmulatorPublisher,
    with_participant_id: bool = True,
) -> None:
    report = {"stageArn": publisher.token["stageArn"], "publishing": True}
    if with_participant_id:
        report["participantId"] = publisher.participant_id
    async with http.post(
        f"{system.gateway_url}/api/rooms/main/publisher/status",
        json=report,
        headers=system.publisher_headers(),
    ) as response:
        assert response.status == 204, await response.text()


async def join(http: aiohttp.ClientSession, system: System, user: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user}) as response:
        return response.status, await response.json()


class StagesEverMade:
    """Every Stage the room ever had, from the stage manager's own change feed (no polling gaps)."""

    def __init__(self, system: System) -> None:
        self.indices: set[int] = set()
        self._task = asyncio.create_task(self._watch(system))

    async def _watch(self, system: System) -> None:
        async for event in system.stagemanager.WatchRoom(stagemanager_pb2.WatchRoomRequest(room="main")):
            if event.HasField("snapshot"):
                for room in event.snapshot.rooms:
                    self.indices.update(stage.index for stage in room.stages)
            elif event.HasField("stage_added"):
                self.indices.add(event.stage_added.index)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class PublisherEvents:
    """The broadcaster's event stream, recorded: which Stages it is told to publish to."""

    def __init__(self, http: aiohttp.ClientSession, system: System) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._task = asyncio.create_task(self._follow(http, system))

    async def _follow(self, http: aiohttp.ClientSession, system: System) -> None:
        url = f"{system.gateway_url}/api/rooms/main/publisher/events"
        async with http.get(url, headers=system.publisher_headers()) as response:
            assert response.status == 200
            async for name, data in read_events(response):
                self.events.append((name, data))

    def stages(self) -> set[str]:
        arns: set[str] = set()
        for name, data in self.events:
            if name == "snapshot":
                arns.update(token["stageArn"] for token in data["tokens"])
            elif name == "stage-added":
                arns.add(data["stageArn"])
        return arns

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def active_replicas(system: System, origin: str, participant: str) -> set[str]:
    # The emulator runs on this event loop: boto3 blocks, so it goes to a thread.
    response = await asyncio.to_thread(
        system.ivs.boto3_client().list_participant_replicas, sourceStageArn=origin, participantId=participant
    )
    return {r["destinationStageArn"] for r in response["replicas"] if r["replicationState"] == "ACTIVE"}


async def test_one_origin_feeds_five_replicas_and_the_room_stops_at_six_stages(tmp_path: Path) -> None:
    async with running_system(tmp_path, **TOPOLOGY) as system, aiohttp.ClientSession() as http:
        made = StagesEverMade(system)
        tokens = (await start_show(http, system))["tokens"]
        assert len(tokens) == 1, tokens  # the page is given one Stage to publish to
        origin = tokens[0]["stageArn"]
        stream = PublisherEvents(http, system)
        broadcaster = await EmulatorPublisher(tokens[0]).publish()
        await report_publishing(http, system, broadcaster)

        # A crowd: each viewer is placed as soon as a LIVE Stage has room; the pool grows behind it.
        placed: Counter[str] = Counter()
        user = 0
        while sum(placed.values()) < 6 * HARD:
            status, body = await join(http, system, f"viewer-{user}")
            if status == 200:
                placed[body["stageArn"]] += 1
                user += 1
                continue
            assert status == 503 and body["error"]["code"] == "no_capacity", body
            await eventually(
                lambda: _has_live_room(http, system), what="a LIVE Stage with room for a viewer", within=20
            )

        info = await room_info(http, system)
        roles = Counter(stage["role"] for stage in info["stages"])
        assert roles == {"origin": 1, "replica": 5}, info["stages"]
        replicas = {stage["stageArn"] for stage in info["stages"] if stage["role"] == "replica"}
        assert all(s["state"] == "LIVE" and s["replication"] == "ACTIVE" for s in info["stages"][1:])
        assert await active_replicas(system, origin, broadcaster.participant_id) == replicas
        # Viewers spread over all six by the balance rule: every Stage took its hard limit.
        assert set(placed) == replicas | {origin} and set(placed.values()) == {HARD}, placed

        # Past 6 x the hard limit: refused, naming the topology, and no 7th Stage is made.
        status, body = await join(http, system, "one-too-many")
        assert status == 503 and body["error"]["code"] == "capacity_exhausted", body
        assert "FANOUT_REPLICAS_PER_ORIGIN" in body["error"]["message"], body
        assert info["capacity"]["bindingLimit"] == "topology" and info["capacity"]["ceiling"] == 6 * HARD
        assert len(made.indices) == 6, made.indices
        stages_in_ivs = (await asyncio.to_thread(system.ivs.boto3_client().list_stages, maxResults=100))[
            "stages"
        ]
        assert len(stages_in_ivs) == 6

        # The broadcaster comes back as a new participant (a reload): every replication follows it.
        await broadcaster.leave()
        fresh = (await start_show(http, system))["tokens"]
        assert [token["stageArn"] for token in fresh] == [origin]
        reloaded = await EmulatorPublisher(fresh[0]).publish()
        assert reloaded.participant_id != broadcaster.participant_id
        await report_publishing(http, system, reloaded)
        await eventually(
            lambda: _equals(active_replicas(system, origin, reloaded.participant_id), replicas),
            what="every replication repaired for the new participant",
            within=REPAIR_BOUND_SECONDS,
        )
        await eventually(
            lambda: _equals(active_replicas(system, origin, broadcaster.participant_id), set()),
            what="the old participant's replications stopped",
            within=REPAIR_BOUND_SECONDS,
        )
        info = await room_info(http, system)
        assert all(s["replication"] == "ACTIVE" for s in info["stages"] if s["role"] == "replica")

        # Only the origin was ever announced to the page, and the room never had a 7th Stage (the
        # autoscaler ticked at full occupancy all through the repair).
        assert stream.stages() == {origin}, stream.events
        assert len(made.indices) == 6, made.indices
        await reloaded.leave()
        await stream.close()
        await made.close()


async def _has_live_room(http: aiohttp.ClientSession, system: System) -> bool:
    info = await room_info(http, system)
    return any(s["state"] == "LIVE" and s["viewers"] < HARD for s in info["stages"])


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_without_the_pages_participant_id_the_stage_manager_finds_the_publisher_in_ivs(
    tmp_path: Path,
) -> None:
    """The monitor's path, and an older page: publishing is known but not who publishes. The stage
    manager asks IVS (GetStage, ListParticipants) and replicates whoever publishes on the origin, also
    after the broadcaster came back as a new participant (once the old one's reconnect window ended)."""
    window = 2
    settings = {
        **TOPOLOGY,
        "FANOUT_MIN_STAGES": "3",
        "FANOUT_REPLICATION_RECONNECT_SECONDS": str(window),
    }
    async with running_system(tmp_path, **settings) as system, aiohttp.ClientSession() as http:
        tokens = (await start_show(http, system))["tokens"]
        origin = tokens[0]["stageArn"]
        info = await room_info(http, system)
        replicas = {s["stageArn"] for s in info["stages"] if s["role"] == "replica"}
        assert len(tokens) == 1 and len(replicas) == 2, info
        broadcaster = await EmulatorPublisher(tokens[0]).publish()
        await report_publishing(http, system, broadcaster, with_participant_id=False)
        await eventually(
            lambda: _equals(active_replicas(system, origin, broadcaster.participant_id), replicas),
            what="replications of the publisher IVS shows",
            within=REPAIR_BOUND_SECONDS,
        )

        await broadcaster.leave()
        reloaded = await EmulatorPublisher((await start_show(http, system))["tokens"][0]).publish()
        await report_publishing(http, system, reloaded, with_participant_id=False)
        await eventually(
            lambda: _equals(active_replicas(system, origin, reloaded.participant_id), replicas),
            what="replications repaired for the participant IVS shows now",
            within=window + REPAIR_BOUND_SECONDS,
        )
        await eventually(
            lambda: _all_replicas_live(http, system),
            what="every replica LIVE again",
            within=REPAIR_BOUND_SECONDS,
        )
        await reloaded.leave()


async def _all_replicas_live(http: aiohttp.ClientSession, system: System) -> bool:
    info = await room_info(http, system)
    return all(
        s["state"] == "LIVE" and s["replication"] == "ACTIVE"
        for s in info["stages"]
        if s["role"] == "replica"
    )
