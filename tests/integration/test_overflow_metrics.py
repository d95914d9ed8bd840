"""The overflow tier's metrics, read from the services' /metrics exposition as Prometheus scrapes it: the
stage manager's composition state per room, start latency, failures by reason and whether overflow is
enabled, and the allocator's refusals that FanoutViewersRefusedDespiteOverflow is built on."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.ivslocal.config import Settings as IvsSettings
from tests.integration.system import System, running_system
from tests.integration.test_overflow import (
    TWO_SEATS,
    ask_token,
    compositions_on,
    end_room,
    go_live,
    running_channel_api,
)
from tests.integration.test_viewers import room_info
from tests.integration.waiting import eventually

STATES = ("STARTING", "ACTIVE", "STOPPING", "STOPPED", "FAILED")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(system: System, service: str) -> Samples:
    """Every sample of the service's exposition, by name and labels."""
    exposition = generate_latest(system.registries[service]).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def composition_states(samples: Samples, room: str = "main") -> dict[str, float]:
    """The room's fanout_overflow_composition series, by state."""
    found = {state: value(samples, "fanout_overflow_composition", room=room, state=state) for state in STATES}
    return {state: got for state, got in found.items() if got is not None}


def only(state: str) -> dict[str, float]:
    return {known: 1.0 if known == state else 0.0 for known in STATES}


async def overflow_state(http: aiohttp.ClientSession, system: System, state: str) -> dict[str, Any] | None:
    overflow = (await room_info(http, system))["overflow"]
    return overflow if overflow and overflow["state"] == state else None


async def test_composition_state_start_latency_and_failure_then_refusals_past_the_ceiling(
    tmp_path: Path,
) -> None:
    with running_channel_api() as channels:
        async with (
            running_system(tmp_path, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, **TWO_SEATS) as system,
            aiohttp.ClientSession() as http,
        ):
            before_show = scrape(system, "stagemanager")
            origin, publisher = await go_live(http, system)
            await eventually(
                lambda: overflow_state(http, system, "ACTIVE"), what="an ACTIVE overflow", within=15
            )
            await eventually(
                lambda: composition_states(scrape(system, "stagemanager")) == only("ACTIVE"),
                what="the composition gauge to say ACTIVE",
                within=10,
            )
            active = scrape(system, "stagemanager")

            [composition] = [
                c for c in await compositions_on(system.ivs, origin) if c["state"] in ("STARTING", "ACTIVE")
            ]
            async with http.post(
                f"{system.ivs.url}/_emulator/compositions/fail", json={"arn": composition["arn"]}
            ) as response:
                assert response.status == 200, await response.text()
            await eventually(
                lambda: composition_states(scrape(system, "stagemanager")) == only("FAILED"),
                what="the composition gauge to say FAILED",
                within=10,
            )
            failed = scrape(system, "stagemanager")

            # Past the ceiling with the composition FAILED: the overflow tier takes nobody (until the
            # retry, FANOUT_OVERFLOW_RETRY_SECONDS later), so the viewer is refused, not answered 500.
            seated = [await ask_token(http, system, user) for user in ("v1", "v2")]

            # The allocator hears of the FAILED state from the stage manager's stream: until then a viewer
            # past the ceiling may still be seated in the overflow tier, so each try is a new viewer.
            late_viewers = (f"late{n}" for n in itertools.count())

            async def refused() -> tuple[int, dict[str, Any]] | None:
                status, body = await ask_token(http, system, next(late_viewers))
                return (status, body) if status != 200 else None

            status, body = await eventually(refused, what="the allocator to refuse past the ceiling")
            allocator = scrape(system, "allocator")

            await end_room(http, system)
            await eventually(
                lambda: not composition_states(scrape(system, "stagemanager")),
                what="the room's composition series removed",
                within=20,
            )
            ended = scrape(system, "stagemanager")
            await publisher.leave()

    assert value(before_show, "fanout_overflow_enabled") == 1.0
    assert composition_states(before_show) == {}
    assert value(active, "fanout_overflow_composition_start_seconds_count") == 1.0
    # The emulator's composition is STARTING for a second, polled every second.
    assert 0.0 < value(active, "fanout_overflow_composition_start_seconds_sum") < 10.0  # type: ignore[operator]
    assert value(active, "fanout_overflow_composition_failures_total", room="main", reason="failed") is None
    assert value(failed, "fanout_overflow_composition_failures_total", room="main", reason="failed") == 1.0
    assert value(failed, "fanout_overflow_composition_failures_total", room="main", reason="refused") is None
    assert [answer[0] for answer in seated] == [200, 200], seated
    assert [answer[1]["tier"] for answer in seated] == ["realtime", "realtime"]
    assert status == 503 and body["error"]["code"] == "capacity_exhausted", body
    # FanoutViewersRefusedDespiteOverflow's inputs: refusals while overflow is enabled.
    refusals = value(allocator, "fanout_viewer_assignments_total", room="main", result="refused")
    assert refusals is not None and refusals >= 1.0
    assert value(ended, "fanout_overflow_composition_start_seconds_count") == 1.0
    assert value(ended, "fanout_overflow_composition_failures_total", room="main", reason="failed") == 1.0


async def test_a_refused_composition_counts_as_refused_with_no_start_latency(tmp_path: Path) -> None:
    # The account's composition quota is used up: StartComposition answers ServiceQuotaExceeded.
    ivs = IvsSettings(port=0, composition_quota=0)
    with running_channel_api() as channels:
        async with (
            running_system(
                tmp_path, ivs, FANOUT_IVS_CHANNEL_ENDPOINT=channels.endpoint, FANOUT_OVERFLOW="auto"
            ) as system,
            aiohttp.ClientSession() as http,
        ):
            _, publisher = await go_live(http, system)
            overflow = await eventually(
                lambda: overflow_state(http, system, "FAILED"), what="the overflow refused", within=15
            )
            await eventually(
                lambda: composition_states(scrape(system, "stagemanager")) == only("FAILED"),
                what="the composition gauge to say FAILED",
                within=10,
            )
            samples = scrape(system, "stagemanager")
            await publisher.leave()

    assert "quota" in overflow["error"].lower(), overflow
    assert value(samples, "fanout_overflow_composition_failures_total", room="main", reason="refused") == 1.0
    assert value(samples, "fanout_overflow_composition_failures_total", room="main", reason="failed") is None
    assert value(samples, "fanout_overflow_composition_start_seconds_count") == 0.0


async def test_with_overflow_off_it_is_reported_disabled_and_no_room_has_a_composition(
    tmp_path: Path,
) -> None:
    async with (
        running_system(tmp_path, FANOUT_OVERFLOW="off") as system,
        aiohttp.ClientSession() as http,
    ):
        _, publisher = await go_live(http, system)
        samples = scrape(system, "stagemanager")
        await publisher.leave()

    assert value(samples, "fanout_overflow_enabled") == 0.0
    assert value(samples, "fanout_room_publishing", room="main") == 1.0
    assert composition_states(samples) == {}
