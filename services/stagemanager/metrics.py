"""The stage manager's Prometheus metrics, fed by the inventory's own change feed."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import Unavailable
from services.stagemanager.inventory import Inventory
from services.stagemanager.model import StageState

log = logging.getLogger(__name__)


class StageManagerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stages = Gauge(
            "fanout_stages", "Stages by room and state.", ["room", "state"], registry=registry
        )
        self.rooms = Gauge("fanout_rooms", "Rooms this stage manager owns.", registry=registry)
        self.publishing = Gauge(
            "fanout_room_publishing",
            "1 while the broadcaster publishes in the room.",
            ["room"],
            registry=registry,
        )
        self.lead_time = Histogram(
            "fanout_stage_lead_time_seconds",
            "Provisioning lead time of Stages made during a show: from CreateStage to first LIVE.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120),
            registry=registry,
        )
        self.provisioning = Histogram(
            "fanout_stage_provisioning_seconds",
            "From the decision to create a Stage to its existing in IVS (STANDBY).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )
        self.creation_failures = Counter(
            "fanout_stage_creation_failures",
            "Stages that could not be created, by room and reason (quota, error).",
            ["room", "reason"],
            registry=registry,
        )
        self.autoscaler_decisions = Counter(
            "fanout_autoscaler_decisions",
            "Pool changes decided by the autoscaler, by room and action (scale_out, drain, delete).",
            ["room", "action"],
            registry=registry,
        )


async def follow_inventory(inventory: Inventory, metrics: StageManagerMetrics) -> None:
    """Keeps the gauges equal to the inventory, refreshed on each of its changes."""
    known_rooms: set[str] = set()
    while True:
        with inventory.subscribe() as subscription:
            try:
                while True:
                    _publish(inventory, metrics, known_rooms)
                    await subscription.next()
            except Unavailable:
                log.warning("metrics fell behind the inventory; resynchronising")
                await asyncio.sleep(0)


def _publish(inventory: Inventory, metrics: StageManagerMetrics, known_rooms: set[str]) -> None:
    rooms = inventory.rooms()
    metrics.rooms.set(len(rooms))
    current = {room.room for room in rooms}
    for gone in known_rooms - current:
        # Every known room had all its series set below, so each one exists to remove.
        for state in StageState:
            metrics.stages.remove(gone, state.value)
        metrics.publishing.remove(gone)
    for room in rooms:
        counts = dict.fromkeys(StageState, 0)
        for stage in room.stages.values():
            counts[stage.state] += 1
        for state, count in counts.items():
            metrics.stages.labels(room.room, state.value).set(count)
        metrics.publishing.labels(room.room).set(1 if room.publishing else 0)
    known_rooms.clear()
    known_rooms.update(current)
