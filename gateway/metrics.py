"""The gateway's Prometheus metrics, registered on a registry the caller owns (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

VIEWER_RESULTS = ("placed", "sticky", "overflow", "refused", "not_found", "error")

# Viewer tokens should take milliseconds (DESIGN.md §11: p99 <= 25 ms); finer buckets at the low end.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http_requests = Counter(
            "fanout_http_requests_total",
            "HTTP requests answered, by route pattern, method and status.",
            ("route", "method", "status"),
            registry=registry,
        )
        self.http_duration = Histogram(
            "fanout_http_request_duration_seconds",
            "Time to answer an HTTP request, by route pattern and method.",
            ("route", "method"),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.http_connections = Gauge(
            "fanout_http_connections",
            "Open HTTP connections to this gateway (at most FANOUT_HTTP_MAX_CONNECTIONS).",
            registry=registry,
        )
        self.http_connections_refused = Counter(
            "fanout_http_connections_refused_total",
            "HTTP connections refused with 503 because FANOUT_HTTP_MAX_CONNECTIONS were open.",
            registry=registry,
        )
        self.viewer_assignments = Counter(
            "fanout_gateway_viewer_requests_total",
            "Viewer token requests answered by the gateway, by result.",
            ("result",),
            registry=registry,
        )
        self.token_issue_duration = Histogram(
            "fanout_token_issue_duration_seconds",
            "Time to issue a viewer token through the gateway (validation, allocator call, JSON).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # Admission (gateway/admission.py): labels name the endpoint's role and why a ticket was
        # refused, never its subject, room or text. The series are pre-created there, for the roles
        # and key source this gateway is configured with.
        self.tickets = Counter(
            "fanout_gateway_tickets_total",
            "Admission tickets checked, by the role the endpoint needs and outcome (accepted, or why not).",
            ("role", "outcome"),
            registry=registry,
        )
        self.jwks_refreshes = Counter(
            "fanout_gateway_jwks_refreshes_total",
            "Fetches of the host app's JWKS (FANOUT_TICKET_JWKS_URL), by outcome (ok, failed).",
            ("outcome",),
            registry=registry,
        )
        for result in VIEWER_RESULTS:
            # Pre-create the series so rate() works from the first scrape.
            self.viewer_assignments.labels(result)
