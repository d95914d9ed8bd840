"""The overflow tier in local mode: past the real-time ceiling, viewers watch the broadcaster's own
camera through the room's channel (the emulator composes the origin into HLS, the IVS Player SDK plays
it), a few seconds behind, instead of being turned away.

One origin of two seats (no replicas, hard limit 2): the real-time ceiling is 2 viewers. The room goes
live, its composition becomes ACTIVE, and four viewers open the watch page: the first two play on the
Stage, the 3rd and 4th play the channel. The broadcast page counts 2 + 2. When a real-time viewer
leaves, an overflow viewer hears of the free seat on its heartbeat and moves to real time by itself.
Ending the room stops the composition and deletes the channel, as boto3 sees them (the emulator and
moto's `ivs` server).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.e2e.conftest import PageProblems, RunningSystem, screenshot, start_system
from tests.e2e.pages import (
    eventually,
    go_live_on_one_stage,
    navigate_away,
    open_broadcaster,
    wait_until_playing,
)
from tests.ports import free_port

pytestmark = pytest.mark.e2e

ROOM = "main"


@pytest.fixture(scope="module")
def overflow_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningSystem, Any]]:
    channel_port = free_port()
    with start_system(
        tmp_path_factory.mktemp("overflow"),
        FANOUT_OVERFLOW="auto",
        FANOUT_OVERFLOW_CHECK_SECONDS="1",
        FANOUT_IVS_CHANNEL_PORT=str(channel_port),
        FANOUT_DIRECT_STAGES="1",
        FANOUT_REPLICAS_PER_ORIGIN="0",
        FANOUT_STAGE_CAPACITY="2",
        FANOUT_STAGE_HARD_LIMIT="2",
        FANOUT_MIN_STAGES="1",
        # Heartbeats every 5 s: how soon an overflow viewer hears that a Stage seat is free.
        FANOUT_VIEWER_LEASE_SECONDS="15",
    ) as system:
        channels = boto3.client(
            "ivs",
            endpoint_url=f"http://127.0.0.1:{channel_port}",
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        yield system, channels


def room_info(system: RunningSystem) -> dict[str, Any]:
    status, info = system.api("GET", f"/api/rooms/{ROOM}")
    assert status == 200, info
    return info


def overflow_active(system: RunningSystem) -> dict[str, Any] | None:
    overflow = room_info(system)["overflow"]
    return overflow if overflow and overflow["state"] == "ACTIVE" else None


# The IVS player calls AWS at start (its device configuration, a PoP lookup); this test stays on
# loopback, so the browser gets empty answers for anything not on loopback (the player plays without).
BEYOND_LOOPBACK = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")


def open_viewer(
    browser: Browser, problems: PageProblems, system: RunningSystem
) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.route(BEYOND_LOOPBACK, lambda route: route.fulfill(status=200, json={}))
    page = problems.watch(context.new_page())
    page.goto(f"{system.base_url}/watch")
    return context, page


def test_viewers_past_the_ceiling_watch_the_overflow_tier(
    overflow_system: tuple[RunningSystem, Any], browser: Browser
) -> None:
    system, channels = overflow_system
    problems = PageProblems()
    ivs = system.ivs()

    broadcaster_context, broadcaster = open_broadcaster(system, browser, problems)
    go_live_on_one_stage(broadcaster)
    overflow = eventually(lambda: overflow_active(system), "the overflow composition ACTIVE", within=30)

    # The first two viewers fill the Stage and play in real time.
    viewers = []
    realtime = []
    for _ in range(2):
        viewers.append(open_viewer(browser, problems, system))
        realtime.append(wait_until_playing(viewers[-1][1]))
    # The next two are past the ceiling: they play the channel.
    late = []
    for _ in range(2):
        viewers.append(open_viewer(browser, problems, system))
        page = viewers[-1][1]
        page.wait_for_function("window.fanoutWatch.tier === 'overflow'", timeout=20_000)
        # HLS: the first segments take a few seconds; the player retries until they are there.
        page.wait_for_function("window.fanoutWatch.state === 'playing'", timeout=45_000)
        late.append(wait_until_playing(page))
        expect(page.locator("#tier-note")).to_be_visible()
        expect(page.locator("#tier")).to_contain_text("Overflow")
    screenshot(viewers[-1][1], "watch-overflow")

    views = [page.evaluate("window.fanoutWatch") for _, page in viewers]
    assert [v["tier"] for v in views] == ["realtime", "realtime", "overflow", "overflow"]
    assert [v["playbackUrl"] for v in views[2:]] == [overflow["playbackUrl"]] * 2
    assert all(seen["stageArn"] for seen in realtime)
    assert all(seen["stageArn"] is None and seen["width"] > 0 for seen in late)

    # The broadcast page counts both tiers.
    summary = broadcaster.locator("#room-summary")
    expect(summary).to_have_attribute("data-realtime", "2", timeout=15_000)
    expect(summary).to_have_attribute("data-overflow", "2", timeout=15_000)
    expect(summary).to_contain_text("2 real-time + 2 overflow")
    expect(summary).to_have_attribute("data-overflow-state", "ACTIVE")
    screenshot(broadcaster, "broadcast-overflow")
    info = room_info(system)
    assert info["viewersByTier"] == {"realtime": 2, "overflow": 2}

    # An overflow viewer who leaves frees its seat.
    navigate_away(viewers[3][1])
    eventually(lambda: room_info(system)["viewersByTier"]["overflow"] == 1, "the overflow viewer gone")

    # A real-time viewer leaves: the remaining overflow viewer hears of the free seat on its next
    # heartbeat and moves to real time on its own, playing on the Stage.
    navigate_away(viewers[0][1])
    moved = viewers[2][1]
    moved.wait_for_function(
        "window.fanoutWatch.tier === 'realtime' && window.fanoutWatch.stageArn", timeout=45_000
    )
    back = wait_until_playing(moved)
    assert back["stageArn"] == realtime[0]["stageArn"]
    expect(moved.locator("#tier-note")).to_be_hidden()
    eventually(lambda: room_info(system)["viewersByTier"] == {"realtime": 2, "overflow": 0}, "2 + 0 viewers")

    # Ending the room stops the composition and deletes the channel.
    origin = next(s["stageArn"] for s in info["stages"] if s["role"] == "origin")
    [composition] = ivs.list_compositions(filterByStageArn=origin)["compositions"]
    assert [c["arn"] for c in channels.list_channels()["channels"]] == [
        ivs.get_composition(arn=composition["arn"])["composition"]["destinations"][0]["configuration"][
            "channel"
        ]["channelArn"]
    ]
    status, _ = system.api("DELETE", f"/api/rooms/{ROOM}", key=system.publisher_key)
    assert status == 204

    def composition_state() -> str:
        return str(ivs.get_composition(arn=composition["arn"])["composition"]["state"])

    eventually(lambda: composition_state() in ("STOPPING", "STOPPED"), "the composition stopped", within=20)
    eventually(lambda: not channels.list_channels()["channels"], "the channel deleted", within=30)

    for context, _ in viewers:
        context.close()
    broadcaster_context.close()
    assert problems.errors == [], problems.errors
