"""The gRPC services' Prometheus endpoints under `make run`: served, and on loopback only."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningSystem

pytestmark = pytest.mark.e2e

# A metric only that service exports: what a scrape of the right process shows.
OWN_METRIC = {
    "stagemanager": "# HELP fanout_rooms ",
    "allocator": "# HELP fanout_viewer_assignments_total ",
    "monitor": "# HELP fanout_monitor_cycle_seconds ",
}


def listening_addresses(port: int) -> set[str]:
    """The local addresses that listen on `port`, from the kernel's TCP tables (hex, as Linux writes them)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_each_service_serves_its_metrics_on_loopback_only(running_system: RunningSystem) -> None:
    # Each process starts its endpoint before it serves gRPC, and the system is ready: no waiting.
    assert set(running_system.metrics_ports) == set(OWN_METRIC)
    for service, port in running_system.metrics_ports.items():
        assert OWN_METRIC[service] in scrape(port), f"{service}'s endpoint serves another's metrics"
        # 127.0.0.1, as the kernel writes it in /proc/net/tcp; 0.0.0.0 would be 00000000.
        assert listening_addresses(port) == {"0100007F"}, f"{service} metrics listen beyond loopback"
