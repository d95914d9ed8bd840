"""The event sources: the inventory's change feed becomes room and Stage events, and viewers against
each room's ceiling become capacity alarms (once per crossing) and periodic summaries."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from services.common.capacity import CapacityLimits
from services.stagemanager.autoscaler import RoomLoad
from services.stagemanager.inventory import Inventory
from services.stagemanager.model import ORIGIN, REPLICA, RoomRecord, StageRecord, StageState
from services.webhooks.events import EventType
from services.webhooks.inventory_events import InventoryEvents
from services.webhooks.occupancy_events import ALARMS, OccupancyEvents, alarm_state
from services.webhooks.outbox import MemoryOutbox
from tests.integration.waiting import eventually

ENDPOINT = "receiver"


class Received:
    """What the one endpoint would be sent, in order, read through the outbox's own claims."""

    def __init__(self, outbox: MemoryOutbox) -> None:
        self._outbox = outbox
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []

    async def take(self) -> list[tuple[str, dict[str, Any]]]:
        """Everything recorded since the last take, as (type, data)."""
        deliveries = await self._outbox.claim(ENDPOINT, time.time() + 60, 10_000, time.time() + 3600)
        taken = []
        for delivery in deliveries:
            await self._outbox.finish(ENDPOINT, delivery.event_id)
            payload = json.loads(delivery.body)
            self.ids.append(delivery.event_id)
            taken.append((payload["type"], payload["data"]))
        return taken

    async def wait_for(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        taken: list[tuple[str, dict[str, Any]]] = []

        async def enough() -> bool:
            taken.extend(await self.take())
            return len(taken) >= count

        # An unexpected event shows up in this answer or the next: the feed is followed in order.
        await eventually(enough, what=f"{count} events", within=5)
        return taken


@asynccontextmanager
async def following(inventory: Inventory, outbox: MemoryOutbox) -> AsyncIterator[list[EventType]]:
    recorded: list[EventType] = []
    task = asyncio.create_task(InventoryEvents(inventory, outbox, recorded.append).run())
    try:
        yield recorded
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def stage(index: int, state: StageState, role: str = ORIGIN, arn: str = "", **fields: Any) -> StageRecord:
    return StageRecord(room="main", index=index, state=state, created_at=0.0, role=role, arn=arn, **fields)


def arn(index: int) -> str:
    return f"arn:aws:ivs:us-east-1:123456789012:stage/s{index}"


def set_publishing(inventory: Inventory, record: StageRecord, publishing: bool) -> None:
    """As RoomManager._set_publishing tells the inventory."""
    state = StageState.LIVE if publishing else StageState.STANDBY
    inventory.update_stage(record, state=state, publishing=publishing)
    inventory.room_publishing_changed(record.room)


async def test_a_show_from_first_stage_to_the_end() -> None:
    inventory, outbox = Inventory(), MemoryOutbox([ENDPOINT])
    received = Received(outbox)
    async with following(inventory, outbox) as recorded:
        inventory.add_room(RoomRecord(room="main", created_at=0.0))
        origin = stage(0, StageState.PROVISIONING)
        inventory.add_stage(origin)  # a Stage being created is not news yet
        inventory.update_stage(origin, state=StageState.STANDBY, arn=arn(0))
        assert await received.wait_for(1) == [
            ("stage.added", {"room": "main", "stageArn": arn(0), "role": "origin"})
        ]
        set_publishing(inventory, origin, True)
        replica = stage(1, StageState.STANDBY, role=REPLICA, arn=arn(1), origin=0)
        inventory.add_stage(replica)
        inventory.update_stage(replica, state=StageState.LIVE, publishing=True)  # replicated: no flip
        assert await received.wait_for(2) == [
            ("room.live", {"room": "main"}),
            ("stage.added", {"room": "main", "stageArn": arn(1), "role": "replica"}),
        ]
        set_publishing(inventory, origin, False)
        inventory.update_stage(replica, state=StageState.DRAINING)
        inventory.update_stage(replica, state=StageState.DELETING)
        inventory.remove_stage(replica)
        assert await received.wait_for(2) == [
            ("room.standby", {"room": "main"}),
            ("stage.removed", {"room": "main", "stageArn": arn(1), "role": "replica"}),
        ]
        set_publishing(inventory, origin, True)
        assert await received.wait_for(1) == [("room.live", {"room": "main"})]
        # Ending: the Stages go DELETING (publishing stops, which is no room.standby), then leave.
        inventory.set_room_ending("main")
        inventory.update_stage(origin, state=StageState.DELETING, publishing=False)
        inventory.room_publishing_changed("main")
        inventory.remove_stage(origin)
        inventory.end_room("main")
        assert await received.wait_for(2) == [
            ("stage.removed", {"room": "main", "stageArn": arn(0), "role": "origin"}),
            ("room.ended", {"room": "main"}),
        ]
    assert len(set(received.ids)) == len(received.ids) == 8
    assert all(event_id.startswith("msg_") for event_id in received.ids)
    assert recorded.count(EventType.STAGE_ADDED) == 2


async def test_a_restarted_source_does_not_announce_again_what_the_outbox_already_has() -> None:
    """The outbox outlives the process (Redis): what a recovered inventory re-adds is not news."""
    outbox = MemoryOutbox([ENDPOINT])
    received = Received(outbox)
    first = Inventory()
    async with following(first, outbox):
        first.add_room(RoomRecord(room="main", created_at=0.0))
        origin = stage(0, StageState.STANDBY, arn=arn(0))
        first.add_stage(origin)
        first.add_stage(stage(1, StageState.STANDBY, arn=arn(1)))
        set_publishing(first, origin, True)
        assert [kind for kind, _ in await received.wait_for(3)] == ["stage.added", "stage.added", "room.live"]

    # A restart: recovery adopts the Stages STANDBY (publishing unknown), Stage 1 being drained and
    # Stage 2 made meanwhile; then the publisher is confirmed again.
    second = Inventory()
    async with following(second, outbox):
        second.add_room(RoomRecord(room="main", created_at=5.0))
        origin = stage(0, StageState.STANDBY, arn=arn(0))
        second.add_stage(origin)
        drained = stage(1, StageState.DRAINING, arn=arn(1))
        second.add_stage(drained)
        second.add_stage(stage(2, StageState.STANDBY, arn=arn(2)))
        set_publishing(second, origin, True)
        assert await received.wait_for(1) == [
            ("stage.added", {"room": "main", "stageArn": arn(2), "role": "origin"})
        ]
        # Stage 1 was announced by the first process: its removal is news, though this one never
        # announced it.
        second.remove_stage(drained)
        set_publishing(second, origin, False)
        assert await received.wait_for(2) == [
            ("stage.removed", {"room": "main", "stageArn": arn(1), "role": "origin"}),
            ("room.standby", {"room": "main"}),
        ]


async def test_a_source_that_fell_behind_the_feed_catches_up_from_a_snapshot() -> None:
    inventory, outbox = Inventory(watcher_queue_limit=2), MemoryOutbox([ENDPOINT])
    received = Received(outbox)
    inventory.add_room(RoomRecord(room="gone", created_at=0.0))
    inventory.add_stage(StageRecord(room="gone", index=0, state=StageState.STANDBY, created_at=0, arn=arn(9)))
    async with following(inventory, outbox):
        assert await received.wait_for(1) == [
            ("stage.added", {"room": "gone", "stageArn": arn(9), "role": "origin"})
        ]
        # More changes at once than the feed holds for a watcher: it resynchronises.
        inventory.add_room(RoomRecord(room="main", created_at=0.0))
        for index in range(4):
            inventory.add_stage(stage(index, StageState.STANDBY, arn=arn(index)))
        inventory.end_room("gone")
        events = await received.wait_for(6)
    assert sorted(events, key=lambda e: (e[0], e[1].get("stageArn", ""))) == [
        ("room.ended", {"room": "gone"}),
        *[("stage.added", {"room": "main", "stageArn": arn(index), "role": "origin"}) for index in range(4)],
        ("stage.removed", {"room": "gone", "stageArn": arn(9), "role": "origin"}),
    ]


def test_alarms_fire_at_their_line_and_rearm_well_below_it() -> None:
    warning, exhausted = ALARMS
    assert [alarm_state(warning, viewers, 100) for viewers in (0, 69, 70, 79, 80, 100, 150)] == [
        False, False, None, None, True, True, True,
    ]  # fmt: skip
    assert [alarm_state(exhausted, viewers, 100) for viewers in (89, 90, 99, 100)] == [
        False,
        None,
        None,
        True,
    ]
    # No room left at all (the region's quota taken by other rooms): exhausted, even with no viewer.
    assert alarm_state(exhausted, 0, 0) is True


class Occupancy:
    """The allocator's GetOccupancy as the autoscaler reads it: effective viewers per Stage."""

    def __init__(self) -> None:
        self.loads: dict[str, RoomLoad] = {}

    def set(self, room: str, **viewers_by_stage: int) -> None:
        self.loads[room] = RoomLoad(
            viewers={arn(int(k[1:])): v for k, v in viewers_by_stage.items()}, joins_total=0
        )

    async def fetch(self) -> dict[str, RoomLoad]:
        return dict(self.loads)


async def capacity_setup(
    summary_seconds: float = 0.0,
) -> tuple[Inventory, Occupancy, Received, OccupancyEvents, Callable[[float], Awaitable[list[Any]]]]:
    # Two Stages of 5 viewers (one origin, one replica): the room's ceiling is 10 viewers.
    limits = CapacityLimits(soft_capacity=5, stage_hard_limit=5, direct_stages=1, replicas_per_origin=1)
    inventory, outbox, occupancy = Inventory(), MemoryOutbox([ENDPOINT]), Occupancy()
    inventory.add_room(RoomRecord(room="main", created_at=0.0))
    inventory.add_stage(stage(0, StageState.LIVE, arn=arn(0), publishing=True))
    clock = [1_000.0]
    source = OccupancyEvents(
        inventory, occupancy, limits, outbox, lambda _: None, 1.0, summary_seconds, clock=lambda: clock[0]
    )
    received = Received(outbox)

    async def tick_at(now: float) -> list[Any]:
        clock[0] = now
        await source.tick()
        return await received.take()

    return inventory, occupancy, received, source, tick_at


async def test_capacity_alarms_fire_once_per_crossing() -> None:
    _, occupancy, _, _, tick_at = await capacity_setup()
    data = {"room": "main", "ceiling": 10, "bindingLimit": "topology"}
    occupancy.set("main", s0=2)
    assert await tick_at(1) == []
    occupancy.set("main", s0=5, s1=3)
    assert await tick_at(2) == [("capacity.warning", {**data, "viewers": 8})]
    occupancy.set("main", s0=5, s1=4)
    assert await tick_at(3) == []  # still past 80 %: no second warning
    occupancy.set("main", s0=5, s1=5)
    assert await tick_at(4) == [("capacity.exhausted", {**data, "viewers": 10})]
    assert await tick_at(5) == []
    occupancy.set("main", s0=5, s1=4)
    assert await tick_at(6) == []  # hovering near the line neither fires nor re-arms
    occupancy.set("main", s0=5, s1=5)
    assert await tick_at(7) == []
    occupancy.set("main", s0=3, s1=3)  # 60 %: both re-arm
    assert await tick_at(8) == []
    occupancy.set("main", s0=5, s1=5)
    assert await tick_at(9) == [
        ("capacity.warning", {**data, "viewers": 10}),
        ("capacity.exhausted", {**data, "viewers": 10}),
    ]


async def test_the_ceiling_counts_the_region_quota_other_rooms_use() -> None:
    inventory, occupancy, _, _, tick_at = await capacity_setup()
    inventory.add_room(RoomRecord(room="other", created_at=0.0))
    occupancy.set("main", s0=4)
    occupancy.loads["other"] = RoomLoad(viewers={"x": 19_997}, joins_total=0)
    # 20,000 subscriptions in the region, 19,997 taken elsewhere: main's ceiling is 3, and it holds 4.
    data = {"room": "main", "viewers": 4, "ceiling": 3, "bindingLimit": "region_subscriptions"}
    events = [(kind, event) for kind, event in await tick_at(1) if event["room"] == "main"]
    assert events == [("capacity.warning", data), ("capacity.exhausted", data)]


async def test_a_summary_per_period_for_rooms_with_viewers() -> None:
    inventory, occupancy, _, _, tick_at = await capacity_setup(summary_seconds=60)
    inventory.add_room(RoomRecord(room="empty", created_at=0.0))
    occupancy.set("main", s0=3)
    summary = ("room.viewers", {"room": "main", "viewers": 3, "ceiling": 10, "live": True})
    assert await tick_at(1_200) == [summary]
    assert await tick_at(1_230) == []
    assert await tick_at(1_259.9) == []
    assert await tick_at(1_260) == [summary]
    occupancy.set("main")
    assert await tick_at(1_320) == []  # no viewers, no summary
