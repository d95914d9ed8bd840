"""One capacity plan (DESIGN.md §5): every IVS limit a room's audience meets, the ceiling they give
the room, and which of them binds. The autoscaler plans with it and the allocator places and refuses
with it, so both name the same limit.

Limits (ivs-facts §3): a Stage takes at most `stage_hard_limit` subscribers; the region admits
`region_subscription_quota` concurrent subscriptions over every Stage of the account; the account has
`region_stage_quota` Stages; a browser publishes to `direct_stages` origins, and IVS replicates one
participant into at most 5 more Stages, so each origin feeds `replicas_per_origin` (0-5) replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from services.common.env import ConfigError, Env

# Concurrent replications of one participant, across the region's Stages: not adjustable.
REPLICATIONS_PER_PARTICIPANT = 5


class Limit(Enum):
    """The limit that binds a room's ceiling; the value is what metrics, logs and the API call it."""

    TOPOLOGY = "topology"
    ROOM_STAGES = "room_stages"
    STAGE_QUOTA = "stage_quota"
    REGION_SUBSCRIPTIONS = "region_subscriptions"


@dataclass(frozen=True)
class CapacityLimits:
    # Viewers per Stage the autoscaler plans for; below the hard limit so a join storm has room.
    soft_capacity: int = 4_000
    stage_hard_limit: int = 10_000
    region_subscription_quota: int = 20_000
    region_stage_quota: int = 1_000
    direct_stages: int = 1
    replicas_per_origin: int = 5
    # An operator's own cap on one room's Stages, whatever the topology allows.
    max_stages_per_room: int = 200

    @property
    def topology_stages(self) -> int:
        return self.direct_stages * (1 + self.replicas_per_origin)


@dataclass(frozen=True)
class Ceiling:
    """The most Stages and viewers one room can have now, and the limit that sets the viewers."""

    room: str
    stages: int
    viewers: int
    binding: Limit
    limits: CapacityLimits

    def describe(self) -> str:
        """For room info: the ceiling, the limit that sets it, and the settings that move it."""
        return f"room {self.room} can hold {self.viewers} viewers, set by {self.reason()}"

    def refusal(self) -> str:
        """For a viewer turned away at the ceiling: the same limit, named."""
        return f"room {self.room} is at its ceiling of {self.viewers} viewers: {self.reason()}"

    def reason(self) -> str:
        limits = self.limits
        return {
            Limit.TOPOLOGY: (
                f"{limits.direct_stages} origin(s) x (1 + {limits.replicas_per_origin} replicas) Stages x "
                f"{limits.stage_hard_limit} viewers per Stage (FANOUT_DIRECT_STAGES, "
                "FANOUT_REPLICAS_PER_ORIGIN, FANOUT_STAGE_HARD_LIMIT)"
            ),
            Limit.ROOM_STAGES: (
                f"FANOUT_MAX_STAGES_PER_ROOM={limits.max_stages_per_room} Stages x "
                f"{limits.stage_hard_limit} viewers per Stage"
            ),
            Limit.STAGE_QUOTA: (
                f"the account's Stage quota (FANOUT_REGION_STAGE_QUOTA={limits.region_stage_quota}) "
                f"leaves this room {self.stages} Stage(s)"
            ),
            Limit.REGION_SUBSCRIPTIONS: (
                f"the region's concurrent-subscription quota ({limits.region_subscription_quota} viewers "
                "in every room together, FANOUT_REGION_SUBSCRIPTION_QUOTA); ask AWS to raise it"
            ),
        }[self.binding]


def room_ceiling(
    limits: CapacityLimits, room: str, *, other_rooms_stages: int = 0, other_rooms_viewers: int = 0
) -> Ceiling:
    """The room's ceiling given what every other room of the deployment holds. On equal ceilings the
    limit listed first binds: the topology, then the room cap, the Stage quota, the region."""
    by_stages = [
        (limits.topology_stages, Limit.TOPOLOGY),
        (limits.max_stages_per_room, Limit.ROOM_STAGES),
        (max(0, limits.region_stage_quota - other_rooms_stages), Limit.STAGE_QUOTA),
    ]
    stages, binding = min(by_stages, key=lambda candidate: candidate[0])
    viewers = stages * limits.stage_hard_limit
    region_left = max(0, limits.region_subscription_quota - other_rooms_viewers)
    if region_left < viewers:
        viewers, binding = region_left, Limit.REGION_SUBSCRIPTIONS
    return Ceiling(room=room, stages=stages, viewers=viewers, binding=binding, limits=limits)


def read_capacity_limits(env: Env) -> CapacityLimits:
    """The plan's settings, shared by the stage manager and the allocator (both must agree)."""
    soft = env.int("FANOUT_STAGE_CAPACITY", CapacityLimits.soft_capacity, minimum=1, maximum=100_000)
    hard = env.int("FANOUT_STAGE_HARD_LIMIT", CapacityLimits.stage_hard_limit, minimum=1, maximum=100_000)
    if hard < soft:
        raise ConfigError(f"FANOUT_STAGE_HARD_LIMIT={hard} is below FANOUT_STAGE_CAPACITY={soft}")
    return CapacityLimits(
        soft_capacity=soft,
        stage_hard_limit=hard,
        region_subscription_quota=env.int(
            "FANOUT_REGION_SUBSCRIPTION_QUOTA",
            CapacityLimits.region_subscription_quota,
            minimum=1,
            maximum=100_000_000,
        ),
        region_stage_quota=env.int(
            "FANOUT_REGION_STAGE_QUOTA", CapacityLimits.region_stage_quota, minimum=1, maximum=1_000_000
        ),
        direct_stages=env.int("FANOUT_DIRECT_STAGES", CapacityLimits.direct_stages, minimum=1, maximum=200),
        replicas_per_origin=env.int(
            "FANOUT_REPLICAS_PER_ORIGIN",
            CapacityLimits.replicas_per_origin,
            minimum=0,
            maximum=REPLICATIONS_PER_PARTICIPANT,
        ),
        max_stages_per_room=env.int(
            "FANOUT_MAX_STAGES_PER_ROOM", CapacityLimits.max_stages_per_room, minimum=1, maximum=1000
        ),
    )
