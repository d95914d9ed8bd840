"""The allocator's Prometheus metrics: placements, token latency, and occupancy per room and Stage."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.ids import stage_id


class AllocatorMetrics:
    def __init__(self, registry: CollectorRegistry, soft_capacity: int, hard_limit: int) -> None:
        self.assignments = Counter(
            "fanout_viewer_assignments",
            "Viewer placements decided by the allocator, by room and result.",
            ["room", "result"],
            registry=registry,
        )
        self.assign_latency = Histogram(
            "fanout_allocator_assign_duration_seconds",
            "Time to place a viewer and mint its token inside the allocator.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )
        self.region_subscriptions = Gauge(
            "fanout_region_subscriptions",
            "Viewers in every room together, as the regional concurrent-subscription quota counts them.",
            registry=registry,
        )
        self.region_subscription_quota = Gauge(
            "fanout_region_subscription_quota",
            "The regional concurrent-subscription quota (FANOUT_REGION_SUBSCRIPTION_QUOTA).",
            registry=registry,
        )
        self.store_up = Gauge(
            "fanout_lease_store_up",
            "1 while the lease store answers (always 1 for the in-process store), 0 during an outage.",
            registry=registry,
        )
        self.reaped = Counter(
            "fanout_leases_reaped",
            "Viewer leases that expired without a leave, by room.",
            ["room"],
            registry=registry,
        )
        self.stage_viewers = Gauge(
            "fanout_stage_viewers",
            "Viewers per Stage by source: leased, observed (in IVS), effective (the max, used to place).",
            ["room", "stage", "source"],
            registry=registry,
        )
        self.drift = Gauge(
            "fanout_occupancy_drift",
            "Leased minus observed viewers per Stage; large either way means leases and IVS disagree.",
            ["room", "stage"],
            registry=registry,
        )
        self.room_viewers = Gauge(
            "fanout_room_viewers", "Viewers holding a live lease, by room.", ["room"], registry=registry
        )
        self.tier_viewers = Gauge(
            "fanout_room_viewers_by_tier",
            "Viewers holding a live lease, by room and tier: realtime (on a Stage) or overflow (the"
            " room's low-latency channel, past the real-time ceiling).",
            ["room", "tier"],
            registry=registry,
        )
        self.overflow = Gauge(
            "fanout_viewer_overflow",
            "Viewers placed beyond soft capacity (summed over the room's Stages), by room.",
            ["room"],
            registry=registry,
        )
        Gauge(
            "fanout_stage_soft_capacity", "Audience per Stage the pool is planned for.", registry=registry
        ).set(soft_capacity)
        Gauge("fanout_stage_hard_limit", "Viewers a Stage never exceeds.", registry=registry).set(hard_limit)
        self._soft_capacity = soft_capacity
        self._stage_labels: set[tuple[str, str]] = set()
        self._rooms: set[str] = set()

    def assignment(self, room: str, result: str) -> None:
        self.assignments.labels(room, result).inc()

    def publish_occupancy(
        self,
        stages: Iterable[tuple[str, str, int, int, int]],
        rooms: dict[str, int],
        overflow_tier: dict[str, int] | None = None,
    ) -> None:
        """Sets the gauges from (room, stage_arn, leased, observed, effective) rows, the real-time viewers
        per room and the overflow tier's per room; drops vanished Stages and rooms."""
        overflow_tier = overflow_tier or {}
        seen: set[tuple[str, str]] = set()
        overflow: dict[str, int] = dict.fromkeys(rooms, 0)
        for room, arn, leased, observed, effective in stages:
            labels = (room, stage_id(arn))
            seen.add(labels)
            self.stage_viewers.labels(*labels, "leased").set(leased)
            self.stage_viewers.labels(*labels, "observed").set(observed)
            self.stage_viewers.labels(*labels, "effective").set(effective)
            self.drift.labels(*labels).set(leased - observed)
            overflow[room] = overflow.get(room, 0) + max(0, effective - self._soft_capacity)
        for labels in self._stage_labels - seen:
            for source in ("leased", "observed", "effective"):
                self.stage_viewers.remove(*labels, source)
            self.drift.remove(*labels)
        self._stage_labels = seen
        for room, viewers in rooms.items():
            self.room_viewers.labels(room).set(viewers)
            self.overflow.labels(room).set(overflow.get(room, 0))
            self.tier_viewers.labels(room, "realtime").set(viewers)
            self.tier_viewers.labels(room, "overflow").set(overflow_tier.get(room, 0))
        for room in self._rooms - set(rooms):
            self.room_viewers.remove(room)
            self.overflow.remove(room)
            self.tier_viewers.remove(room, "realtime")
            self.tier_viewers.remove(room, "overflow")
        self._rooms = set(rooms)
