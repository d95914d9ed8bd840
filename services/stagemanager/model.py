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

ORIGIN = "origin"
REPLICA = "replica"


class Replication(Enum):
    """A replica Stage's feed from its origin (DESIGN.md §5); an origin's is NONE."""

    NONE = "NONE"
    # The origin has no publisher to replicate yet.
    WAITING = "WAITING"
    ACTIVE = "ACTIVE"
    # It was active and stopped, or StartParticipantReplication was refused: repair is due.
    STOPPED = "STOPPED"


@dataclass
class StageRecord:
    room: str
    index: int
    state: StageState
    created_at: float
    role: str = ORIGIN
    # A replica's origin (its index in the room); -1 for an origin.
    origin: int = -1
    replication: Replication = Replication.NONE
    # Why the last replication attempt into this replica failed; empty when none did.
    replication_error: str = ""
    # An origin's publishing participant (the publisher token's jti), as reported or seen in IVS.
    publisher_id: str = ""
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
    # The overflow tier (services/stagemanager/overflow.py): a low-latency channel and the composition
    # of an origin into it. State is an OverflowState name without its prefix, "" when there is none.
    overflow_state: str = ""
    overflow_channel_arn: str = ""
    overflow_playback_url: str = ""
    overflow_composition_arn: str = ""
    overflow_error: str = ""

    @property
    def publishing(self) -> bool:
        """The broadcaster publishes on an origin (a replica's publisher is IVS's copy of it)."""
        return any(stage.publishing for stage in self.stages.values() if stage.role == ORIGIN)

    def origins(self) -> list[StageRecord]:
        return [s for _, s in sorted(self.stages.items()) if s.role == ORIGIN]

    def replicas_of(self, origin: StageRecord) -> list[StageRecord]:
        return [s for _, s in sorted(self.stages.items()) if s.role == REPLICA and s.origin == origin.index]

    def stage_by_arn(self, arn: str) -> StageRecord | None:
        return next((stage for stage in self.stages.values() if stage.arn == arn), None)

    def next_index(self) -> int:
        return max(self.stages, default=-1) + 1

    def copy(self, with_stages: bool = True) -> RoomRecord:
        stages = {index: stage.copy() for index, stage in self.stages.items()} if with_stages else {}
        return dataclasses.replace(self, stages=stages)
