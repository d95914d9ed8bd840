"""Rooms and their Stages as the stage manager knows them (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum


class StageState(Enum):
    PROVISIONING = "PROVISIONING"
    STANDBY = "STANDBY"
    LIVE = "LIVE"
    DRAINING = "DRAINING"
    DELETING = "DELETING"
    FAILED = "FAILED"


# States in which the Stage exists in IVS and may hold viewers.
EXISTING_STATES = frozenset({StageState.STANDBY, StageState.LIVE, StageState.DRAINING})
# The pool that takes new viewers now or soon: what free capacity is counted over.
ACTIVE_STATES = frozenset({StageState.PROVISIONING, StageState.STANDBY, StageState.LIVE})


@dataclass
class StageRecord:
    room: str
    index: int
    state: StageState
    created_at: float
    role: str = "origin"
    arn: str = ""
    events_url: str = ""
    whip_url: str = ""
    publishing: bool = False
    # When `publishing` last changed: an observation older than that must not undo it.
    publishing_since: float = 0.0
    # When the Stage first existed in IVS, and first went LIVE: the autoscaler's lead-time samples.
    ready_at: float = 0.0
    live_at: float = 0.0
    # Why a FAILED Stage failed: "quota" or "error".
    failure: str = ""
    # Created while the broadcaster was live: only such a Stage's time to LIVE measures lead time
    # (an earlier one waited for the show to start, however fast it was made).
    during_show: bool = False

    def copy(self) -> StageRecord:
        return dataclasses.replace(self)

    @property
    def lead_time(self) -> float | None:
        """From CreateStage to first LIVE, for a Stage made during a show; None for any other Stage.

        The one definition of provisioning lead time: the autoscaler plans with it and the
        `fanout_stage_lead_time_seconds` histogram reports it. A Stage made before the show waited
        for the broadcaster, however fast IVS made it, so it measures nothing.
        """
        if self.during_show and self.live_at > self.created_at:
            return self.live_at - self.created_at
        return None


@dataclass
class RoomRecord:
    room: str
    created_at: float
    stages: dict[int, StageRecord] = field(default_factory=dict)
    last_error: str = ""
    # The last sign of a broadcaster (publisher tokens asked for, publishing): idle rooms end.
    active_at: float = 0.0
    # Being ended: recorded in IVS (a tag) before any Stage is deleted, so a restart finishes the job.
    ending: bool = False

    @property
    def publishing(self) -> bool:
        return any(stage.publishing for stage in self.stages.values())

    def stage_by_arn(self, arn: str) -> StageRecord | None:
        return next((stage for stage in self.stages.values() if stage.arn == arn), None)

    def next_index(self) -> int:
        return max(self.stages, default=-1) + 1

    def copy(self, with_stages: bool = True) -> RoomRecord:
        stages = {index: stage.copy() for index, stage in self.stages.items()} if with_stages else {}
        return dataclasses.replace(self, stages=stages)
