"""The webhooks' Prometheus metrics; endpoints appear by host only (a URL may carry credentials)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.webhooks.events import EventType
from services.webhooks.outbox import Backlog
from services.webhooks.settings import Endpoint

OUTCOMES = ("delivered", "retried", "failed")


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry, endpoints: Sequence[Endpoint]) -> None:
        self.deliveries = Counter(
            "fanout_webhook_deliveries",
            "Webhook delivery attempts by endpoint host and outcome: delivered, retried (failed, to be "
            "tried again), failed (given up after FANOUT_WEBHOOK_GIVE_UP_SECONDS).",
            ["endpoint_host", "outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "fanout_webhook_pending",
            "Events waiting in the outbox for an endpoint.",
            ["endpoint_host"],
            registry=registry,
        )
        self.oldest_pending_age = Gauge(
            "fanout_webhook_oldest_pending_age_seconds",
            "Age of the oldest event waiting for an endpoint; 0 when none waits.",
            ["endpoint_host"],
            registry=registry,
        )
        self.events = Counter(
            "fanout_webhook_events",
            "Events put in the outbox, by type.",
            ["type"],
            registry=registry,
        )
        # Every series exists from the start, so an increase from nothing is seen by the alerts.
        for endpoint in endpoints:
            for outcome in OUTCOMES:
                self.deliveries.labels(endpoint.label, outcome)
            self.pending.labels(endpoint.label).set(0)
            self.oldest_pending_age.labels(endpoint.label).set(0)
        for event_type in EventType:
            self.events.labels(event_type.value)

    def report_backlog(self, endpoint: Endpoint, backlog: Backlog, now: float) -> None:
        self.pending.labels(endpoint.label).set(backlog.pending)
        oldest = backlog.oldest_created_at
        self.oldest_pending_age.labels(endpoint.label).set(max(0.0, now - oldest) if oldest else 0.0)
