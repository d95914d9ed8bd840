"""Every service's real /metrics output passes `promtool check metrics` (Prometheus naming conventions)."""

from __future__ import annotations

import subprocess

import aiohttp
from prometheus_client import generate_latest

from tests.integration.audience import place_viewers
from tests.integration.monitor_fixtures import running_monitor
from tests.integration.system import System
from tests.integration.waiting import eventually
from tests.prometheus_binaries import require_binary


def promtool_check_metrics(promtool: str, exposition: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition.decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_every_service_metrics_pass_promtool_lint(system: System) -> None:
    promtool = require_binary("promtool")
    await place_viewers(system, 3)
    allocator = system.registries["allocator"]
    await eventually(
        lambda: allocator.get_sample_value("fanout_room_viewers", {"room": "main"}) == 3,
        what="the allocator's occupancy gauges",
        within=5,
    )
    # What Prometheus really scrapes from the gateway: its own /metrics route; the gRPC services serve
    # their registry as is on their metrics port. Any service added to the system is linted too.
    async with aiohttp.ClientSession() as http, http.get(f"{system.gateway_url}/metrics") as response:
        assert response.status == 200
        expositions = {"gateway": await response.read()}
    for service, registry in system.registries.items():
        expositions.setdefault(service, generate_latest(registry))
    async with running_monitor(system) as monitor:
        await eventually(
            lambda: monitor.metric("fanout_monitor_stages") == 1, what="the monitor to watch the Stage"
        )
        expositions["monitor"] = generate_latest(monitor.registry)
    assert {"gateway", "stagemanager", "allocator", "monitor"} <= expositions.keys()
    findings = {}
    for service, exposition in expositions.items():
        assert b"fanout_" in exposition, service
        result = promtool_check_metrics(promtool, exposition)
        if result.returncode != 0 or result.stdout or result.stderr:
            findings[service] = result.stdout + result.stderr
    assert findings == {}
