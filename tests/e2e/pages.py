"""Helpers the e2e modules share: waiting, the watch page's video, the emulator's participants, tokens."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page

from tests.e2e.conftest import PageProblems, RunningSystem

VIDEO = "document.querySelector('#video')"


def eventually(condition: Callable[[], Any], what: str, within: float = 15) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.2)


def eventually_on(page: Page, condition: Callable[[], Any], what: str, within: float = 15) -> Any:
    """eventually() for what Playwright handlers (routes, routed sockets) record: each poll goes
    through the page, since the sync API delivers events to handlers only while it is called."""
    return eventually(lambda: page.evaluate("true") and condition(), what, within)


def navigate_away(page: Page) -> None:
    """The viewer leaves the way a user does: pagehide runs and the watch page sends its leave beacon.

    Navigating waits for the unload handlers and keeps the browser context up while the beacon goes
    out; page.close(run_before_unload=True) does neither, so a beacon could be lost (the lease then
    lives its full term)."""
    page.goto("about:blank")


def open_broadcaster(
    system: RunningSystem, browser: Browser, problems: PageProblems, room: str | None = None
) -> tuple[BrowserContext, Page]:
    """The broadcast page with its camera preview playing and the publisher key filled in, ready to
    Go live (in `room`, or the page's default room)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = problems.watch(context.new_page())
    page.goto(f"{system.base_url}/broadcast" + (f"?room={room}" if room else ""))
    page.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    page.fill("#publisher-key", system.publisher_key)
    return context, page


def go_live_on_one_stage(page: Page) -> None:
    """Go live, and wait until the page publishes on its one Stage (the origin)."""
    page.click("#go-live")
    page.wait_for_function(
        "window.fanoutBroadcast.state === 'live' && window.fanoutBroadcast.stages.length === 1"
        " && window.fanoutBroadcast.stages[0].publishState === 'published'",
        timeout=20_000,
    )


def connected_participants(ivs: Any, stage_arn: str) -> dict[str, dict[str, Any]]:
    """participantId -> summary for the CONNECTED participants of the Stage's active session."""
    session_id = ivs.get_stage(arn=stage_arn)["stage"].get("activeSessionId")
    if session_id is None:
        return {}
    listed = ivs.list_participants(stageArn=stage_arn, sessionId=session_id, filterByState="CONNECTED")
    return {p["participantId"]: p for p in listed["participants"]}


def wait_until_playing(page: Page) -> dict[str, Any]:
    """Waits for the broadcaster's video to play: frames have a size and time moves on."""
    page.wait_for_function("window.fanoutWatch.state === 'playing'", timeout=20_000)
    page.wait_for_function(f"{VIDEO}.videoWidth > 0", timeout=10_000)
    start = page.evaluate(f"{VIDEO}.currentTime")
    page.wait_for_function(f"{VIDEO}.currentTime > {start} + 0.5", timeout=10_000)
    return dict(
        page.evaluate(
            f"""() => ({{
                width: {VIDEO}.videoWidth,
                height: {VIDEO}.videoHeight,
                currentTime: {VIDEO}.currentTime,
                muted: {VIDEO}.muted,
                stageArn: window.fanoutWatch.stageArn,
                participantId: window.fanoutWatch.participantId,
            }})"""
        )
    )


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token_claims(token: str) -> dict[str, Any]:
    """A participant token's claims, read as the SDK reads them: the JWT payload, unverified."""
    return dict(json.loads(b64url_decode(token.split(".")[1])))
