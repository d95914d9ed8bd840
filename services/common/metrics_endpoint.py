"""The Prometheus endpoint each gRPC service serves beside its gRPC port: its address, and starting it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from services.common.env import Env

# All interfaces by default: Prometheus scrapes a pod by its IP. 127.0.0.1 keeps a laptop's metrics to
# itself; an IPv6 address or a host name also works.
DEFAULT_METRICS_HOST = "0.0.0.0"
METRICS_HOST_PATTERN = r"[0-9A-Za-z.:-]{1,253}"


def read_metrics_host(env: Env) -> str:
    """FANOUT_METRICS_HOST: one setting for every service's metrics endpoint."""
    return env.str("FANOUT_METRICS_HOST", DEFAULT_METRICS_HOST, pattern=METRICS_HOST_PATTERN)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> None:
    """Serves /metrics on `host:port` from a thread of its own; port 0 turns the endpoint off."""
    if port:
        start_http_server(port, addr=host, registry=registry)
