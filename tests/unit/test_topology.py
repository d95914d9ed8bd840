"""The capacity plan and the topology: where a room's next Stage goes, what scale-in takes first, and
which limit sets a room's ceiling (DESIGN.md §5)."""

from __future__ import annotations

from services.common.capacity import CapacityLimits, Limit, room_ceiling
from services.stagemanager.autoscaler import AutoscalerSettings, free_slots, plan_room
from services.stagemanager.model import ORIGIN, REPLICA, Replication, RoomRecord, StageRecord, StageState
from services.stagemanager.topology import Slot, drain_candidates, next_slot

ONE_ORIGIN = CapacityLimits(soft_capacity=10, stage_hard_limit=20, direct_stages=1, replicas_per_origin=5)


def arn(index: int) -> str:
    return f"arn:aws:ivs:us-east-1:1:stage/s{index}"


def add(room: RoomRecord, role: str, origin: int = -1, state: StageState = StageState.LIVE) -> StageRecord:
    index = room.next_index()
    stage = StageRecord(
        room=room.room, index=index, state=state, created_at=0.0, role=role, origin=origin, arn=arn(index)
    )
    room.stages[index] = stage
    return stage


def grow(room: RoomRecord, limits: CapacityLimits) -> list[Slot]:
    """Adds Stages where next_slot says until the topology is full."""
    slots = []
    while (slot := next_slot(room, limits)) is not None:
        slots.append(slot)
        add(room, slot.role, slot.origin)
        assert len(slots) < 100, "the topology never filled"
    return slots


def test_one_origin_feeds_five_replicas_and_nothing_more() -> None:
    room = RoomRecord(room="main", created_at=0.0)
    slots = grow(room, ONE_ORIGIN)
    assert slots == [Slot(ORIGIN)] + [Slot(REPLICA, 0)] * 5
    assert len(room.origins()) == 1 and len(room.replicas_of(room.stages[0])) == 5


def test_replicas_spread_over_origins_before_a_new_origin_is_opened() -> None:
    limits = CapacityLimits(direct_stages=2, replicas_per_origin=2)
    room = RoomRecord(room="main", created_at=0.0)
    roles = [(slot.role, slot.origin) for slot in grow(room, limits)]
    # The broadcaster's second upload is paid for only once the first origin is full.
    assert roles == [(ORIGIN, -1), (REPLICA, 0), (REPLICA, 0), (ORIGIN, -1), (REPLICA, 3), (REPLICA, 3)]


def test_without_replicas_every_stage_is_an_origin_up_to_the_direct_budget() -> None:
    limits = CapacityLimits(direct_stages=3, replicas_per_origin=0)
    room = RoomRecord(room="main", created_at=0.0)
    assert grow(room, limits) == [Slot(ORIGIN)] * 3


def test_a_draining_origin_gets_no_new_replicas_and_failed_stages_hold_no_place() -> None:
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN, state=StageState.DRAINING)
    add(room, REPLICA, origin.index, state=StageState.FAILED)
    assert next_slot(room, ONE_ORIGIN) is None  # the only origin drains, and the budget is one
    origin.state = StageState.LIVE
    assert next_slot(room, ONE_ORIGIN) == Slot(REPLICA, origin.index)


def test_a_replica_being_deleted_still_holds_its_place() -> None:
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN)
    for _ in range(4):
        add(room, REPLICA, origin.index)
    add(room, REPLICA, origin.index, state=StageState.DELETING)
    assert next_slot(room, ONE_ORIGIN) is None  # a 7th Stage would exist until the delete lands


def test_scale_in_takes_replicas_before_their_origin() -> None:
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN)
    lone = add(room, ORIGIN)
    replica = add(room, REPLICA, origin.index)
    usable = list(room.stages.values())
    assert drain_candidates(room, usable) == [replica]
    del room.stages[replica.index]
    assert drain_candidates(room, [origin, lone]) == [origin, lone]


def test_the_autoscaler_never_plans_past_the_topology() -> None:
    settings = AutoscalerSettings(limits=ONE_ORIGIN, min_free_slots=0)
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN)
    for _ in range(4):
        add(room, REPLICA, origin.index)
    viewers = {stage.arn: 10 for stage in room.stages.values()}
    assert plan_room(room, viewers, 100, settings, False, True).create == 1
    add(room, REPLICA, origin.index)
    viewers = {stage.arn: 10 for stage in room.stages.values()}
    assert plan_room(room, viewers, 100, settings, False, True).create == 0


def test_the_autoscaler_drains_a_replica_not_the_emptier_origin() -> None:
    settings = AutoscalerSettings(limits=ONE_ORIGIN, min_free_slots=0, min_stages=1)
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN)
    replica = add(room, REPLICA, origin.index)
    plan = plan_room(room, {origin.arn: 0, replica.arn: 3}, 0, settings, surplus_ripe=True, may_create=True)
    assert plan.drain is replica


def test_a_replica_whose_replication_is_refused_counts_as_full() -> None:
    room = RoomRecord(room="main", created_at=0.0)
    origin = add(room, ORIGIN)
    replica = add(room, REPLICA, origin.index, state=StageState.STANDBY)
    assert free_slots(room, {origin.arn: 4}, 10) == 10 + 10 - 4
    replica.replication = Replication.STOPPED
    assert free_slots(room, {origin.arn: 4}, 10) == 10 - 4


def test_defaults_let_one_broadcaster_reach_the_regional_quota() -> None:
    ceiling = room_ceiling(CapacityLimits(), "main")
    assert (ceiling.stages, ceiling.viewers, ceiling.binding) == (6, 20_000, Limit.REGION_SUBSCRIPTIONS)
    assert "FANOUT_REGION_SUBSCRIPTION_QUOTA" in ceiling.describe()


def test_the_ceiling_names_the_limit_that_binds() -> None:
    topology = room_ceiling(ONE_ORIGIN, "main")
    assert (topology.stages, topology.viewers, topology.binding) == (6, 120, Limit.TOPOLOGY)
    assert "FANOUT_REPLICAS_PER_ORIGIN" in topology.describe() and "120 viewers" in topology.describe()
    # Room info says what the room can hold; only a refusal says it is at its ceiling.
    assert "can hold" in topology.describe() and "at its ceiling" in topology.refusal()
    other_rooms = room_ceiling(ONE_ORIGIN, "main", other_rooms_viewers=19_950)
    assert (other_rooms.viewers, other_rooms.binding) == (50, Limit.REGION_SUBSCRIPTIONS)
    stage_quota = room_ceiling(
        CapacityLimits(stage_hard_limit=20, region_stage_quota=10), "main", other_rooms_stages=8
    )
    assert (stage_quota.stages, stage_quota.viewers, stage_quota.binding) == (2, 40, Limit.STAGE_QUOTA)
    capped = room_ceiling(CapacityLimits(stage_hard_limit=20, max_stages_per_room=3), "main")
    assert (capped.stages, capped.binding) == (3, Limit.ROOM_STAGES)
