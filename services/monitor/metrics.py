"""The monitor's Prometheus metrics: refresh ages, pass time, participants IVS sees, events, reports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REFRESH_AGE = "fanout_monitor_stage_refresh_age_seconds"
REFRESH_AGE_HELP = "Seconds since the monitor last counted the Stage's participants completely."


class RefreshAgeCollector(Collector):
    """Ages computed at scrape time, so a stuck monitor shows growing ages rather than frozen ones."""

    def __init__(self, ages: Callable[[], list[tuple[str, str, float]]]) -> None:
        self._ages = ages

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(REFRESH_AGE, REFRESH_AGE_HELP, labels=["room", "stage"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(REFRESH_AGE, REFRESH_AGE_HELP, labels=["room", "stage"])
        for room, stage, age in self._ages():
            family.add_metric([room, stage], max(0.0, age))
        yield family


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry, stage_quota: int) -> None:
        self._registry = registry
        self.cycle = Histogram(
            "fanout_monitor_cycle_seconds",
            "Time of one monitor pass: ListStages, then one turn for every Stage of the cluster.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.participants = Gauge(
            "fanout_monitor_observed_participants",
            "CONNECTED participants IVS lists on the Stage at its last complete count, by role.",
            ["room", "stage", "role"],
            registry=registry,
        )
        self.stages = Gauge(
            "fanout_monitor_stages", "Stages of this cluster the monitor watches.", registry=registry
        )
        self.account_stages = Gauge(
            "fanout_monitor_account_stages",
            "Stages in the IVS account and region, any cluster (counts against the Stage quota).",
            registry=registry,
        )
        Gauge(
            "fanout_ivs_stage_quota", "The account's IVS Stage quota in this region.", registry=registry
        ).set(stage_quota)
        self.events = Counter(
            "fanout_monitor_events",
            "IVS Stage Update events from SQS by event and outcome (handled, duplicate, stale, malformed, "
            "ignored).",
            ["event", "outcome"],
            registry=registry,
        )
        self.report_failures = Counter(
            "fanout_monitor_report_failures",
            "Observation reports that did not reach their target (allocator, stagemanager).",
            ["target"],
            registry=registry,
        )

    def follow_refresh_ages(self, ages: Callable[[], list[tuple[str, str, float]]]) -> None:
        self._registry.register(RefreshAgeCollector(ages))

    def observed(self, room: str, stage: str, publishers: int, subscribers: int) -> None:
        self.participants.labels(room, stage, "publisher").set(publishers)
        self.participants.labels(room, stage, "subscriber").set(subscribers)

    def forget(self, room: str, stage: str) -> None:
        for role in ("publisher", "subscriber"):
            with contextlib.suppress(KeyError):
                self.participants.remove(room, stage, role)
