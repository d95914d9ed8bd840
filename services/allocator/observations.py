"""Viewers the monitor saw connected in IVS, per Stage, until the observation goes stale."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    subscribers: int
    observed_at: float


class ObservedViewers:
    """The latest observation per Stage; a stale one counts as nothing rather than as old truth."""

    def __init__(self, ttl_seconds: float) -> None:
        self._ttl = ttl_seconds
        self._by_stage: dict[str, Observation] = {}

    def record(self, stage_arn: str, subscribers: int, observed_at: float) -> None:
        current = self._by_stage.get(stage_arn)
        # Observations may arrive out of order (several monitor replicas, retries): keep the newest.
        if current is None or observed_at >= current.observed_at:
            self._by_stage[stage_arn] = Observation(max(0, subscribers), observed_at)

    def subscribers(self, stage_arn: str, now: float) -> int:
        observation = self._by_stage.get(stage_arn)
        if observation is None or now - observation.observed_at > self._ttl:
            return 0
        return observation.subscribers

    def forget(self, stage_arn: str) -> None:
        self._by_stage.pop(stage_arn, None)
