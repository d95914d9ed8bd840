"""fanout_overflow_composition follows the inventory: 1 for a room's composition state, no series for a
room without one or once it ended, and only from the leader (as every per-room gauge)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry

from services.common.capacity import CapacityLimits
from services.stagemanager.inventory import Inventory
from services.stagemanager.metrics import StageManagerMetrics, follow_inventory
from services.stagemanager.model import RoomRecord
from tests.integration.waiting import eventually

STATES = ("STARTING", "ACTIVE", "STOPPING", "STOPPED", "FAILED")


def composition(registry: CollectorRegistry, room: str = "main") -> dict[str, float]:
    found = {
        state: registry.get_sample_value("fanout_overflow_composition", {"room": room, "state": state})
        for state in STATES
    }
    return {state: value for state, value in found.items() if value is not None}


def only(state: str) -> dict[str, float]:
    return {known: 1.0 if known == state else 0.0 for known in STATES}


@asynccontextmanager
async def following(
    inventory: Inventory, registry: CollectorRegistry, leads: Callable[[], bool]
) -> AsyncIterator[None]:
    task = asyncio.create_task(
        follow_inventory(inventory, StageManagerMetrics(registry), CapacityLimits(), leads)
    )
    try:
        yield
    finally:
        task.cancel()


async def test_the_gauge_is_the_rooms_composition_state_and_goes_with_it() -> None:
    inventory = Inventory()
    registry = CollectorRegistry()
    inventory.add_room(RoomRecord("main", created_at=0.0))
    inventory.add_room(RoomRecord("quiet", created_at=0.0))
    async with following(inventory, registry, lambda: True):
        await eventually(lambda: registry.get_sample_value("fanout_rooms") == 2, what="the rooms")
        without = composition(registry)

        inventory.set_room_overflow("main", state="STARTING")
        await eventually(lambda: composition(registry) == only("STARTING"), what="STARTING")
        inventory.set_room_overflow("main", state="ACTIVE")
        await eventually(lambda: composition(registry) == only("ACTIVE"), what="ACTIVE")
        quiet = composition(registry, "quiet")

        # The ending clears the room's overflow (OverflowManager.end_room): no composition, no series.
        inventory.set_room_overflow("main", state="")
        await eventually(lambda: composition(registry) == {}, what="the series removed")
        inventory.set_room_overflow("main", state="FAILED")
        await eventually(lambda: composition(registry) == only("FAILED"), what="FAILED")
        inventory.end_room("main")
        await eventually(lambda: composition(registry) == {}, what="the ended room's series removed")

    assert without == {}
    assert quiet == {}


async def test_a_follower_reports_no_composition_state() -> None:
    inventory = Inventory()
    registry = CollectorRegistry()
    inventory.add_room(RoomRecord("main", created_at=0.0))
    inventory.set_room_overflow("main", state="ACTIVE")
    leading = False
    async with following(inventory, registry, lambda: leading):
        inventory.set_room_overflow("main", state="FAILED")
        # One more change after FAILED: the follower has seen both, and reported neither.
        inventory.set_room_overflow("main", error="x")
        await asyncio.sleep(0.05)
        as_follower = composition(registry)

        leading = True
        inventory.set_room_overflow("main", error="")
        await eventually(lambda: composition(registry) == only("FAILED"), what="the leader's report")

    assert as_follower == {}
