"""Observation reports survive a target being down: newest kept per Stage, retried, one warning per outage."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from services.monitor.metrics import MonitorMetrics
from services.monitor.observations import ALLOCATOR, STAGEMANAGER, Observation, ObservationReporter

ARN = "arn:aws:ivs:us-east-1:123456789012:stage/"


def observation(stage: str, subscribers: int, at: float) -> Observation:
    return Observation("main", ARN + stage, "st-0123456789abc", 1, subscribers, at)


class Target:
    def __init__(self) -> None:
        self.up = True
        self.batches: list[list[Observation]] = []

    async def send(self, observations: list[Observation]) -> None:
        if not self.up:
            raise ConnectionError("down")
        self.batches.append(observations)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_down_target_is_retried_with_the_newest_observations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    allocator, stagemanager = Target(), Target()
    clock = Clock()
    reporter = ObservationReporter(
        {ALLOCATOR: allocator.send, STAGEMANAGER: stagemanager.send},
        MonitorMetrics(registry, 1000),
        retry_seconds=5,
        clock=clock,
    )
    allocator.up = False
    with caplog.at_level(logging.INFO, logger="services.monitor.observations"):
        for at in range(3):
            reporter.submit(ALLOCATOR, [observation("a", at, at), observation("b", 10 + at, at)])
            reporter.submit(STAGEMANAGER, [observation("a", at, at)])
            await reporter.flush()
            clock.now += 1
        # The other target is unaffected; the failing one was tried once, then waits out its retry delay.
        assert len(stagemanager.batches) == 3
        assert registry.get_sample_value("fanout_monitor_report_failures_total", {"target": ALLOCATOR}) == 1
        assert reporter.pending(ALLOCATOR) == 2

        clock.now = 5
        await reporter.flush()
        assert registry.get_sample_value("fanout_monitor_report_failures_total", {"target": ALLOCATOR}) == 2
        allocator.up = True
        clock.now = 10
        await reporter.flush()
    assert [(o.stage_arn[-1], o.subscribers) for o in allocator.batches[0]] == [("a", 2), ("b", 12)]
    assert reporter.pending(ALLOCATOR) == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "allocator" in warnings[0].getMessage()
    assert any("takes observations again" in r.getMessage() for r in caplog.records)


async def test_an_older_observation_never_replaces_a_newer_one() -> None:
    target = Target()
    target.up = False
    reporter = ObservationReporter({ALLOCATOR: target.send}, None, retry_seconds=0)
    reporter.submit(ALLOCATOR, [observation("a", 7, at=20)])
    reporter.submit(ALLOCATOR, [observation("a", 3, at=10)])
    target.up = True
    await reporter.flush()
    assert [o.subscribers for o in target.batches[0]] == [7]
