"""The pages in local mode, in real headless Chromium against the real system started like `make run`."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Browser, expect

from tests.e2e.conftest import PageProblems, RunningSystem, screenshot

pytestmark = pytest.mark.e2e


def wait_for_viewers(system: RunningSystem, count: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while True:
        status, info = system.api("GET", "/api/rooms/main")
        if status == 200 and info["viewers"] == count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"room main has {info.get('viewers')} viewers, expected {count}")
        time.sleep(0.2)


def test_broadcast_page_takes_the_key_and_shows_every_stage(
    running_system: RunningSystem, browser: Browser
) -> None:
    problems = PageProblems()
    context = browser.new_context()
    page = problems.watch(context.new_page())
    page.goto(f"{running_system.base_url}/broadcast")
    expect(page.locator("#go-live")).to_be_enabled()
    page.fill("#publisher-key", "not-the-key-at-all-000")
    page.click("#go-live")
    expect(page.locator("#error")).to_contain_text("401")

    page.fill("#publisher-key", running_system.publisher_key)
    page.click("#go-live")
    rows = page.locator("#stages-body tr[data-stage-arn]")
    expect(rows).to_have_count(2)
    status, info = running_system.api("GET", "/api/rooms/main")
    assert status == 200
    shown = sorted(rows.nth(i).get_attribute("data-stage-arn") or "" for i in range(2))
    assert shown == sorted(stage["stageArn"] for stage in info["stages"])
    expect(page.locator("#mode-note")).to_be_visible()
    screenshot(page, "broadcast-local")
    context.close()
    assert problems.errors == []


def test_watch_page_gets_a_stage_heartbeats_and_leaves_on_close(
    running_system: RunningSystem, browser: Browser
) -> None:
    status, _ = running_system.api("POST", "/api/token/publisher-all", {}, key=running_system.publisher_key)
    assert status == 200
    _, before = running_system.api("GET", "/api/rooms/main")
    problems = PageProblems()
    context = browser.new_context()
    page = problems.watch(context.new_page())
    page.goto(f"{running_system.base_url}/watch")
    page.wait_for_function("window.fanoutWatch && window.fanoutWatch.state === 'local-no-media'")
    stage_arn = page.locator("#stage-id").get_attribute("data-stage-arn")
    assert stage_arn in {stage["stageArn"] for stage in before["stages"]}
    wait_for_viewers(running_system, before["viewers"] + 1)
    user_id = page.evaluate("window.fanoutWatch.userId")
    status, renewed = running_system.api("POST", "/api/viewer/heartbeat", {"room": "main", "userId": user_id})
    assert status == 200 and renewed["leaseSeconds"] == 30
    screenshot(page, "watch-local")

    page.close(run_before_unload=True)
    wait_for_viewers(running_system, before["viewers"])
    context.close()
    assert problems.errors == []
