"""Where a room's next Stage goes and which Stage goes first: origins and their replicas (DESIGN.md §5).

The page publishes to every origin (at most `direct_stages`); each origin feeds up to
`replicas_per_origin` replicas through server-side replication. A new Stage becomes a replica of an
origin with room for one before it becomes another origin, since a replica costs the broadcaster
nothing. Scale-in takes replicas first; an origin goes only once nothing replicates from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.capacity import CapacityLimits
from services.stagemanager.model import ORIGIN, REPLICA, RoomRecord, StageRecord, StageState

# A Stage in these states holds a place in the topology: it exists in IVS, or soon will, or is
# still being deleted (so a replacement never makes one Stage more than the topology allows).
_HOLDS_A_PLACE = frozenset(set(StageState) - {StageState.FAILED})
# An origin in these states may be given new replicas.
_FEEDS_NEW_REPLICAS = frozenset({StageState.PROVISIONING, StageState.STANDBY, StageState.LIVE})


@dataclass(frozen=True)
class Slot:
    role: str
    # The origin's index for a replica; -1 for an origin.
    origin: int = -1


def placed(room: RoomRecord) -> list[StageRecord]:
    return [stage for stage in room.stages.values() if stage.state in _HOLDS_A_PLACE]


def next_slot(room: RoomRecord, limits: CapacityLimits) -> Slot | None:
    """The place of the room's next Stage, or None when the topology is full."""
    stages = placed(room)
    origins = sorted((s for s in stages if s.role == ORIGIN), key=lambda s: s.index)
    fed = {origin.index: 0 for origin in origins}
    for stage in stages:
        if stage.role == REPLICA and stage.origin in fed:
            fed[stage.origin] += 1
    growing = [
        origin
        for origin in origins
        if origin.state in _FEEDS_NEW_REPLICAS and fed[origin.index] < limits.replicas_per_origin
    ]
    if growing:
        # The origin with the fewest replicas, so several origins share the load evenly.
        chosen = min(growing, key=lambda origin: (fed[origin.index], origin.index))
        return Slot(REPLICA, chosen.index)
    if len(origins) < limits.direct_stages:
        return Slot(ORIGIN)
    return None


def drain_candidates(room: RoomRecord, usable: list[StageRecord]) -> list[StageRecord]:
    """The Stages of `usable` that scale-in may drain now: replicas while there are any, otherwise
    origins that feed nothing (their replicas' viewers would lose the show)."""
    replicas = [stage for stage in usable if stage.role == REPLICA]
    if replicas:
        return replicas
    feeding = {stage.origin for stage in placed(room) if stage.role == REPLICA}
    return [stage for stage in usable if stage.role == ORIGIN and stage.index not in feeding]


def emptiest(candidates: list[StageRecord], viewers: Mapping[str, int]) -> StageRecord | None:
    """The emptiest goes; among equals the newest, so the pool keeps its low, stable indices."""
    return min(candidates, key=lambda s: (viewers.get(s.arn, 0), -s.index), default=None)
