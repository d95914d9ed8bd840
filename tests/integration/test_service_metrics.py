"""Each service's Prometheus metrics tell the truth about rooms, Stages and viewers."""

from __future__ import annotations

import aiohttp
from prometheus_client import CollectorRegistry

from tests.integration.system import System
from tests.integration.waiting import eventually


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_metrics_follow_rooms_stages_and_viewers(system: System) -> None:
    stagemanager = system.registries["stagemanager"]
    allocator = system.registries["allocator"]
    gateway = system.registries["gateway"]
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{system.gateway_url}/api/token/publisher-all", json={}, headers=system.publisher_headers()
        ) as response:
            arn = (await response.json())["tokens"][0]["stageArn"]
        async with http.post(
            f"{system.gateway_url}/api/rooms/main/publisher/status",
            json={"stageArn": arn, "publishing": True},
            headers=system.publisher_headers(),
        ):
            pass
        for user in ("a", "b", "c"):
            async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": user}):
                pass
        async with http.post(f"{system.gateway_url}/api/token/viewer", json={"userId": "a"}):
            pass

    await eventually(
        lambda: sample(stagemanager, "fanout_stages", room="main", state="LIVE") == 1, what="LIVE gauge"
    )
    assert sample(stagemanager, "fanout_stages", room="main", state="STANDBY") == 0
    assert sample(stagemanager, "fanout_room_publishing", room="main") == 1
    # Made before the show, the Stage waited for the broadcaster: that measures no lead time.
    assert sample(stagemanager, "fanout_stage_lead_time_seconds_count") == 0
    assert sample(stagemanager, "fanout_stage_provisioning_seconds_count") == 1
    assert sample(allocator, "fanout_viewer_assignments_total", room="main", result="placed") == 3
    assert sample(allocator, "fanout_viewer_assignments_total", room="main", result="sticky") == 1
    stage = arn.rsplit("/", 1)[1]
    await eventually(
        lambda: sample(allocator, "fanout_stage_viewers", room="main", stage=stage, source="leased") == 3,
        what="the occupancy gauges to refresh",
        within=5,
    )
    assert sample(allocator, "fanout_room_viewers", room="main") == 3
    assert sample(allocator, "fanout_occupancy_drift", room="main", stage=stage) == 3
    assert sample(gateway, "fanout_gateway_viewer_requests_total", result="placed") == 3
    ok = sample(
        allocator,
        "fanout_grpc_server_handled_total",
        grpc_service="fanout.v1.Allocator",
        grpc_method="AssignViewer",
        grpc_code="OK",
    )
    assert ok == 4
    assert (sample(stagemanager, "fanout_ivs_calls_total", operation="CreateStage", outcome="ok") or 0) == 1
