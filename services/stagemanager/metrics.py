"""The stage manager's Prometheus metrics, fed by the inventory's own change feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.capacity import CapacityLimits, room_ceiling
from services.common.errors import Unavailable
from services.stagemanager.inventory import Inventory
from services.stagemanager.model import ORIGIN, REPLICA, Replication, StageState
from services.stagemanager.overflow import COMPOSITION_STATES
from services.stagemanager.topology import placed

_REPLICA_STATES = (Replication.ACTIVE, Replication.WAITING, Replication.STOPPED)

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
        self.replicas = Gauge(
            "fanout_replicas",
            "Replica Stages by room and replication state (ACTIVE, WAITING for a publisher, STOPPED).",
            ["room", "replication"],
            registry=registry,
        )
        self.replication_starts = Counter(
            "fanout_replication_starts",
            "StartParticipantReplication calls by room and outcome (started, refused).",
            ["room", "outcome"],
            registry=registry,
        )
        # Headroom of the capacity plan per room (DESIGN.md §5): used against limit, by limit:
        # stages (the room's Stage ceiling), origins (FANOUT_DIRECT_STAGES), replicas_per_origin
        # (the fullest origin against FANOUT_REPLICAS_PER_ORIGIN, at most IVS's 5).
        self.room_used = Gauge(
            "fanout_room_capacity_used",
            "What a room uses of each capacity-plan limit (stages, origins, replicas_per_origin).",
            ["room", "limit"],
            registry=registry,
        )
        self.room_limit = Gauge(
            "fanout_room_capacity_limit",
            "Each capacity-plan limit of a room (stages, origins, replicas_per_origin).",
            ["room", "limit"],
            registry=registry,
        )
        self.region_stages = Gauge(
            "fanout_region_stages",
            "Stages of this deployment in IVS, every room together.",
            registry=registry,
        )
        self.region_stage_quota = Gauge(
            "fanout_region_stage_quota",
            "The account's Stage quota in the region (FANOUT_REGION_STAGE_QUOTA).",
            registry=registry,
        )
        self.leader = Gauge(
            "fanout_stagemanager_leader",
            "1 while this stage manager replica leads (acts on IVS), 0 while it follows.",
            registry=registry,
        )
        self.leadership_acquired = Counter(
            "fanout_stagemanager_leadership_acquired",
            "Times this replica took the leader lease (a change of leader when counted over replicas).",
            registry=registry,
        )
        self.autoscaler_decisions = Counter(
            "fanout_autoscaler_decisions",
            "Pool changes decided by the autoscaler, by room and action (scale_out, drain, delete).",
            ["room", "action"],
            registry=registry,
        )
        # The overflow tier (services/stagemanager/overflow.py, DESIGN.md §5).
        self.overflow_enabled = Gauge(
            "fanout_overflow_enabled",
            "1 when rooms get an overflow tier (FANOUT_OVERFLOW=auto), 0 when it is off.",
            registry=registry,
        )
        self.overflow_composition = Gauge(
            "fanout_overflow_composition",
            "The state of each room's overflow composition: 1 for the current state, 0 for the others;"
            " no series while the room has none.",
            ["room", "state"],
            registry=registry,
        )
        self.overflow_start = Histogram(
            "fanout_overflow_composition_start_seconds",
            "From StartComposition to the composition first seen ACTIVE (seen by polling, so to about"
            " a second).",
            buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 120),
            registry=registry,
        )
        self.overflow_failures = Counter(
            "fanout_overflow_composition_failures",
            "Overflow compositions that could not start, by room and reason: refused (IVS refused a"
            " call: a quota, a permission) or failed (the composition went FAILED).",
            ["room", "reason"],
            registry=registry,
        )


_ROOM_LIMITS = ("stages", "origins", "replicas_per_origin")


async def follow_inventory(
    inventory: Inventory,
    metrics: StageManagerMetrics,
    limits: CapacityLimits,
    leads: Callable[[], bool] = lambda: True,
) -> None:
    """Keeps the gauges equal to the inventory, refreshed on each of its changes. Only the leader
    reports them: a follower's copy is the same inventory, and two replicas reporting it would make
    every sum over instances count each Stage twice."""
    known_rooms: set[str] = set()
    metrics.region_stage_quota.set(limits.region_stage_quota)
    while True:
        with inventory.subscribe() as subscription:
            try:
                while True:
                    if leads():
                        _publish(inventory, metrics, known_rooms, limits)
                    # Also now and then: a follower that took over reports without waiting for a change.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscription.next(), 5.0)
            except Unavailable:
                # A follower's copy was replaced wholesale (loaded from Redis): start again from it.
                log.info("inventory replaced; metrics follow the new one")
                await asyncio.sleep(0)


def _publish(
    inventory: Inventory, metrics: StageManagerMetrics, known_rooms: set[str], limits: CapacityLimits
) -> None:
    rooms = inventory.rooms()
    metrics.rooms.set(len(rooms))
    current = {room.room for room in rooms}
    for gone in known_rooms - current:
        # Every known room had all its series set below, so each one exists to remove.
        for state in StageState:
            metrics.stages.remove(gone, state.value)
        for replication in _REPLICA_STATES:
            metrics.replicas.remove(gone, replication.value)
        for limit in _ROOM_LIMITS:
            metrics.room_used.remove(gone, limit)
            metrics.room_limit.remove(gone, limit)
        metrics.publishing.remove(gone)
        _publish_overflow(metrics, gone, "")
    all_placed = sum(len(placed(room)) for room in rooms)
    metrics.region_stages.set(all_placed)
    for room in rooms:
        counts = dict.fromkeys(StageState, 0)
        for stage in room.stages.values():
            counts[stage.state] += 1
        for state, count in counts.items():
            metrics.stages.labels(room.room, state.value).set(count)
        metrics.publishing.labels(room.room).set(1 if room.publishing else 0)
        _publish_overflow(metrics, room.room, room.overflow_state)
        holding = placed(room)
        replicas = dict.fromkeys(_REPLICA_STATES, 0)
        for stage in holding:
            if stage.role == REPLICA and stage.replication in replicas:
                replicas[stage.replication] += 1
        for replication, count in replicas.items():
            metrics.replicas.labels(room.room, replication.value).set(count)
        ceiling = room_ceiling(limits, room.room, other_rooms_stages=all_placed - len(holding))
        origins = [stage for stage in holding if stage.role == ORIGIN]
        fed = [sum(1 for s in holding if s.role == REPLICA and s.origin == o.index) for o in origins]
        used = {"stages": len(holding), "origins": len(origins), "replicas_per_origin": max(fed, default=0)}
        limit_of = {
            "stages": ceiling.stages,
            "origins": limits.direct_stages,
            "replicas_per_origin": limits.replicas_per_origin,
        }
        for name in _ROOM_LIMITS:
            metrics.room_used.labels(room.room, name).set(used[name])
            metrics.room_limit.labels(room.room, name).set(limit_of[name])
    known_rooms.clear()
    known_rooms.update(current)


def _publish_overflow(metrics: StageManagerMetrics, room: str, state: str) -> None:
    """One series per state while the room has a composition (1 for its state), none otherwise."""
    for known in COMPOSITION_STATES:
        if state in COMPOSITION_STATES:
            metrics.overflow_composition.labels(room, known).set(1 if known == state else 0)
        else:
            metrics.overflow_composition.remove(room, known)
