"""The autoscaler's decisions: grow ahead of the join rate, shrink after a cooldown, never below the floor."""

from __future__ import annotations

from services.common.capacity import CapacityLimits
from services.stagemanager.autoscaler import (
    AutoscalerSettings,
    JoinRate,
    free_slots,
    lead_time,
    plan_room,
    wanted_free_slots,
)
from services.stagemanager.model import RoomRecord, StageRecord, StageState

# Browser fan-out (every Stage an origin), 10 Stages at most: the topology's own rules are in test_topology.
BROWSER_FAN_OUT = CapacityLimits(soft_capacity=50, direct_stages=10, replicas_per_origin=0)
SETTINGS = AutoscalerSettings(limits=BROWSER_FAN_OUT, min_stages=1, min_free_slots=10)


def room_with(*states: StageState, publishing: bool = True) -> RoomRecord:
    room = RoomRecord(room="main", created_at=0.0)
    for index, state in enumerate(states):
        arn = "" if state is StageState.PROVISIONING else f"arn:aws:ivs:us-east-1:1:stage/s{index}"
        room.stages[index] = StageRecord(
            room="main", index=index, state=state, created_at=0.0, arn=arn, publishing=publishing
        )
    return room


def arn(index: int) -> str:
    return f"arn:aws:ivs:us-east-1:1:stage/s{index}"


def test_free_slots_count_only_stages_that_take_viewers() -> None:
    room = room_with(StageState.LIVE, StageState.PROVISIONING, StageState.DRAINING)
    assert free_slots(room, {arn(0): 30, arn(2): 40}, 50) == 50 + 50 - 30


def test_a_join_storm_provisions_several_stages_at_once() -> None:
    room = room_with(StageState.LIVE)
    wanted = wanted_free_slots(join_rate=100, lead_seconds=2, settings=SETTINGS)
    plan = plan_room(room, {arn(0): 40}, wanted, SETTINGS, surplus_ripe=False, may_create=True)
    assert wanted == 300
    assert plan.create == 6  # (300 - 10) / 50 rounded up


def test_quiet_room_keeps_the_minimum_free_slots() -> None:
    room = room_with(StageState.LIVE)
    wanted = wanted_free_slots(0, 3, SETTINGS)
    assert plan_room(room, {arn(0): 35}, wanted, SETTINGS, False, True).create == 0
    assert plan_room(room, {arn(0): 45}, wanted, SETTINGS, False, True).create == 1


def test_growth_stops_at_the_room_maximum_and_while_the_quota_refuses() -> None:
    room = room_with(*[StageState.LIVE] * 9)
    viewers = {arn(i): 50 for i in range(9)}
    assert plan_room(room, viewers, 500, SETTINGS, False, may_create=True).create == 1
    assert plan_room(room, viewers, 500, SETTINGS, False, may_create=False).create == 0


def test_no_stage_is_made_past_the_regional_subscription_quota() -> None:
    room = room_with(StageState.LIVE)
    viewers = {arn(0): 50}
    # 500 free slots wanted, but the region admits only 120 more viewers: 3 Stages of 50, not 9.
    assert plan_room(room, viewers, 500, SETTINGS, False, True, region_left=120).create == 3
    assert plan_room(room, viewers, 500, SETTINGS, False, True, region_left=0).create == 0
    assert plan_room(room, viewers, 500, SETTINGS, False, True, region_left=None).create == 9  # room maximum


def test_draining_stages_come_back_before_new_ones_are_made() -> None:
    room = room_with(StageState.LIVE, StageState.DRAINING)
    plan = plan_room(room, {arn(0): 50, arn(1): 5}, 60, SETTINGS, False, True)
    assert [s.index for s in plan.reactivate] == [1]
    assert plan.create == 1


def test_scale_in_drains_the_emptiest_only_once_the_surplus_is_ripe() -> None:
    room = room_with(StageState.LIVE, StageState.LIVE, StageState.LIVE)
    viewers = {arn(0): 5, arn(1): 0, arn(2): 3}
    assert plan_room(room, viewers, 10, SETTINGS, surplus_ripe=False, may_create=True).drain is None
    plan = plan_room(room, viewers, 10, SETTINGS, surplus_ripe=True, may_create=True)
    assert plan.drain is not None and plan.drain.index == 1


def test_never_below_the_minimum_stages() -> None:
    room = room_with(StageState.LIVE)
    settings = AutoscalerSettings(limits=BROWSER_FAN_OUT, min_stages=1, min_free_slots=0)
    assert plan_room(room, {}, 0, settings, surplus_ripe=True, may_create=True).drain is None


def test_drained_stages_are_retired_only_when_empty() -> None:
    room = room_with(StageState.LIVE, StageState.DRAINING, StageState.DRAINING)
    plan = plan_room(room, {arn(0): 1, arn(1): 2, arn(2): 0}, 10, SETTINGS, False, True)
    assert [s.index for s in plan.retire] == [2]


def test_join_rate_over_a_sliding_window() -> None:
    rate = JoinRate(window_seconds=10)
    assert rate.add(0.0, 0) == 0
    assert rate.add(1.0, 100) == 100
    assert rate.add(2.0, 300) == 150
    for second in range(3, 30):
        rate.add(float(second), 300)
    assert rate.add(30.0, 300) == 0
    assert rate.add(31.0, 10) == 0  # a restarted allocator's counter starts again


def test_lead_time_is_measured_per_room() -> None:
    room = room_with(StageState.LIVE, StageState.LIVE, StageState.LIVE)
    room.stages[0].live_at = 60.0  # made before the show: it waited for the broadcaster
    assert lead_time(room, default=3.0) == 3.0
    for index, live_at in ((1, 4.0), (2, 2.0)):
        room.stages[index].live_at = live_at
        room.stages[index].during_show = True
    assert lead_time(room, default=3.0) == 3.0
    room.stages[2].live_at = 1.0
    assert lead_time(room, default=3.0) == 2.5
    fresh = room_with(StageState.STANDBY, publishing=False)
    assert lead_time(fresh, default=7.0) == 7.0
    fresh.stages[0].ready_at = 0.5
    assert lead_time(fresh, default=7.0) == 0.5
