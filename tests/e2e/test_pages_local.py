"""The pages in local mode, in real headless Chromium against the real system started like `make run`."""

from __future__ import annotations

import time
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.e2e.conftest import PageProblems, RunningSystem, screenshot
from tests.e2e.pages import connected_participants, eventually, navigate_away, wait_until_playing

pytestmark = pytest.mark.e2e

ROOM = "main"


def room_info(system: RunningSystem) -> dict[str, Any]:
    status, info = system.api("GET", f"/api/rooms/{ROOM}")
    assert status == 200, info
    return info


def wait_for_viewers(system: RunningSystem, count: int, within: float = 20) -> None:
    """The room's viewer count is the larger of the leases and what the monitor last saw in IVS (a
    pass every 5 s), so after a viewer leaves, a pass that started before can still count it."""
    eventually(lambda: room_info(system)["viewers"] == count, f"{count} viewers in room {ROOM}", within)


def test_index_page_links_both_pages(running_system: RunningSystem, browser: Browser) -> None:
    problems = PageProblems()
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone screen
    page = problems.watch(context.new_page())
    page.goto(running_system.base_url)
    expect(page.locator("#link-broadcast")).to_have_attribute("href", "/broadcast")
    expect(page.locator("#link-watch")).to_have_attribute("href", "/watch")
    page.click("#link-watch")
    expect(page).to_have_url(f"{running_system.base_url}/watch")
    context.close()
    assert problems.errors == []


def test_a_viewer_waits_while_nobody_broadcasts_and_leaves_on_close(
    running_system: RunningSystem, browser: Browser
) -> None:
    # Publish tokens create the room's Stages; nobody publishes, so they stay STANDBY.
    status, _ = running_system.api("POST", "/api/token/publisher-all", {}, key=running_system.publisher_key)
    assert status == 200
    wait_for_viewers(running_system, 0)
    before = room_info(running_system)
    problems = PageProblems()
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = problems.watch(context.new_page())
    page.goto(f"{running_system.base_url}/watch")
    page.wait_for_function("window.fanoutWatch && window.fanoutWatch.state === 'waiting'")
    expect(page.locator("#video-overlay")).to_have_text("Waiting for the broadcaster…")
    stage_arn = page.locator("#stage-id").get_attribute("data-stage-arn")
    assert stage_arn in {stage["stageArn"] for stage in before["stages"]}
    wait_for_viewers(running_system, 1)
    user_id = page.evaluate("window.fanoutWatch.userId")
    status, renewed = running_system.api("POST", "/api/viewer/heartbeat", {"room": ROOM, "userId": user_id})
    assert status == 200 and renewed["leaseSeconds"] == 30

    navigate_away(page)
    wait_for_viewers(running_system, 0)
    context.close()
    assert problems.errors == []


def open_viewer(
    system: RunningSystem, browser: Browser, problems: PageProblems
) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = problems.watch(context.new_page())
    page.goto(f"{system.base_url}/watch")
    return context, page


def test_the_show_three_viewers_watch_the_broadcaster(
    running_system: RunningSystem, browser: Browser
) -> None:
    started = time.monotonic()
    problems = PageProblems()
    ivs = running_system.ivs()
    # Nobody watches yet. (Not a count read now: it could still include a viewer who just left.)
    wait_for_viewers(running_system, 0)

    # The broadcaster: a bad key is refused clearly, the right one goes live on every Stage.
    broadcaster_context = browser.new_context()
    broadcaster = problems.watch(broadcaster_context.new_page())
    broadcaster.goto(f"{running_system.base_url}/broadcast")
    expect(broadcaster.locator("#go-live")).to_be_enabled()
    expect(broadcaster.locator("#mode-note")).to_contain_text("Local mode")
    broadcaster.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    broadcaster.fill("#publisher-key", "not-the-key-at-all-000")
    broadcaster.click("#go-live")
    expect(broadcaster.locator("#error")).to_contain_text("401")
    broadcaster.fill("#publisher-key", running_system.publisher_key)
    broadcaster.click("#go-live")
    broadcaster.wait_for_function(
        "window.fanoutBroadcast.stages.length === 2"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'published')",
        timeout=15_000,
    )
    publisher_ids = {
        s["stageArn"]: s["participantId"] for s in broadcaster.evaluate("window.fanoutBroadcast.stages")
    }
    eventually(
        lambda: (
            {s["stageArn"]: s["state"] for s in room_info(running_system)["stages"]}
            == dict.fromkeys(publisher_ids, "LIVE")
        ),
        "both Stages LIVE",
    )
    rows = broadcaster.locator("#stages-body tr[data-stage-arn]")
    expect(rows).to_have_count(2)
    expect(broadcaster.locator("#stages-body tr[data-state='LIVE']")).to_have_count(2)
    live_after = time.monotonic() - started

    # Three viewers, each in its own browser context (own storage, own viewer id).
    viewers = [open_viewer(running_system, browser, problems) for _ in range(3)]
    playing = [wait_until_playing(page) for _, page in viewers]
    playing_after = time.monotonic() - started
    for seen in playing:
        assert seen["width"] > 0 and seen["height"] > 0 and seen["muted"] is True
        assert seen["stageArn"] in publisher_ids
    by_stage = {
        arn: sorted(s["participantId"] for s in playing if s["stageArn"] == arn) for arn in publisher_ids
    }
    assert sorted(len(ids) for ids in by_stage.values()) == [1, 2], "least-loaded placement spreads them"
    expect(viewers[0][1].locator("#unmute")).to_be_visible()
    expect(viewers[0][1].locator("#stage-id")).to_have_text(playing[0]["stageArn"].rsplit("/", 1)[1])
    wait_for_viewers(running_system, 3)

    # The emulator sees the publisher and each subscriber CONNECTED on the right Stage.
    for stage_arn, publisher_id in publisher_ids.items():
        connected = connected_participants(ivs, stage_arn)
        assert connected[publisher_id]["published"] is True
        assert set(by_stage[stage_arn]) <= set(connected)
        others = {arn for arn in publisher_ids if arn != stage_arn}
        assert not any(set(by_stage[arn]) & set(connected) for arn in others)

    broadcaster.locator("#room-summary").scroll_into_view_if_needed()
    expect(broadcaster.locator("#room-summary")).to_contain_text(f"{3} viewer(s)")
    screenshot(broadcaster, "broadcast-live")
    screenshot(viewers[0][1], "watch-playing")

    # A viewer closing its page ends its lease and leaves its Stage.
    leaving = playing[2]
    navigate_away(viewers[2][1])
    wait_for_viewers(running_system, 2)
    eventually(
        lambda: leaving["participantId"] not in connected_participants(ivs, leaving["stageArn"]),
        "the closed viewer to be DISCONNECTED",
    )

    # DisconnectParticipant kicks a viewer for good; its page recovers with a new token on its own.
    kicked = playing[1]
    ivs.disconnect_participant(stageArn=kicked["stageArn"], participantId=kicked["participantId"])
    viewers[1][1].wait_for_function(
        f"window.fanoutWatch.participantId !== {kicked['participantId']!r}", timeout=15_000
    )
    recovered = wait_until_playing(viewers[1][1])
    assert recovered["participantId"] in connected_participants(ivs, recovered["stageArn"])
    wait_for_viewers(running_system, 2)

    # The broadcaster stops: the Stages go STANDBY and the viewers wait.
    broadcaster.click("#stop")
    eventually(
        lambda: all(s["state"] == "STANDBY" for s in room_info(running_system)["stages"]),
        "every Stage STANDBY",
    )
    for _, page in viewers[:2]:
        page.wait_for_function("window.fanoutWatch.state === 'waiting'", timeout=10_000)
        expect(page.locator("#video-overlay")).to_have_text("Waiting for the broadcaster…")
    for stage_arn, publisher_id in publisher_ids.items():
        assert publisher_id not in connected_participants(ivs, stage_arn)
    screenshot(viewers[0][1], "watch-waiting")

    # Live again: the waiting viewers play without reloading.
    broadcaster.click("#go-live")
    for _, page in viewers[:2]:
        wait_until_playing(page)

    for context, _ in viewers:
        context.close()
    broadcaster_context.close()
    assert problems.errors == []
    print(
        f"\nlive after {live_after:.1f}s; 3 viewers playing after {playing_after:.1f}s; "
        f"video sizes {[(s['width'], s['height']) for s in playing]}; "
        f"viewers per Stage {[len(ids) for ids in by_stage.values()]}"
    )
