"""The broadcast page recovers from what goes wrong on a Stage, and its red box says only what is wrong now.

The page gets its first tokens from POST /api/token/publisher-all and fresh ones in every snapshot of
the publisher events stream; a snapshot is when it joins again a Stage it gave up on. The token tests
hand the page bad tokens for one round by rewriting the real publisher-all answer, then let the real
snapshot bring good ones, and check that the page ends up publishing everywhere with no stale error.
The last test delays the page's publish reports until their Stages are gone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route, WebSocketRoute, expect

from tests.e2e.conftest import PageProblems, RunningSystem, screenshot
from tests.e2e.pages import (
    b64url_decode,
    b64url_encode,
    connected_participants,
    eventually,
    eventually_on,
    open_broadcaster,
    token_claims,
)

pytestmark = pytest.mark.e2e

STAGES = 2  # the running_system fixture keeps two Stages per room


def expired(token: str) -> str:
    """The token with `exp` a minute ago (the signature no longer matches, but the SDK checks `exp`
    on the client first, so the page sees what an expired token gives it: TOKEN_EXPIRED)."""
    header, _, signature = token.split(".")
    claims = token_claims(token)
    claims["exp"] = int(time.time()) - 60
    return ".".join([header, b64url_encode(json.dumps(claims).encode()), signature])


def badly_signed(token: str) -> str:
    """The token with one bit of its signature flipped: well-formed and unexpired, refused at join."""
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    return ".".join([header, payload, b64url_encode(bytes(raw))])


def hand_out_bad_tokens(page: Page, spoil: Callable[[str], str]) -> list[dict[str, Any]]:
    """Rewrites the next publisher-all answer only; returns the spoiled token entries once sent."""
    spoiled: list[dict[str, Any]] = []

    def rewrite(route: Route) -> None:
        response = route.fetch()
        answer = response.json()
        for entry in answer["tokens"]:
            entry["token"] = spoil(entry["token"])
            spoiled.append(entry)
        route.fulfill(response=response, json=answer)

    page.route("**/api/token/publisher-all", rewrite, times=1)
    return spoiled


def assert_publishing_everywhere_without_error(system: RunningSystem, page: Page, room: str) -> None:
    page.wait_for_function(
        f"window.fanoutBroadcast.stages.length === {STAGES}"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'published')",
        timeout=20_000,
    )
    expect(page.locator("#status")).to_contain_text(f"publishing to {STAGES} of {STAGES} Stage(s)")
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("window.fanoutBroadcast.error") is None
    assert all(s["problem"] is None for s in page.evaluate("window.fanoutBroadcast.stages"))
    expect(page.locator("#stages-body td.local.problem")).to_have_count(0)
    ivs = system.ivs()
    for stage in page.evaluate("window.fanoutBroadcast.stages"):
        eventually(
            lambda stage=stage: (
                connected_participants(ivs, stage["stageArn"])
                .get(stage["participantId"], {})
                .get("published")
            ),
            f"the emulator to see the publisher published on {stage['stageArn']}",
        )
    status, info = system.api("GET", f"/api/rooms/{room}")
    assert status == 200 and len(info["stages"]) == STAGES, info


def stop(page: Page) -> None:
    page.click("#stop")
    page.wait_for_function(
        "window.fanoutBroadcast.state === 'idle' && window.fanoutBroadcast.stages.length === 0"
    )
    expect(page.locator("#error")).to_be_hidden()


def test_expired_tokens_fail_the_join_then_the_snapshot_repairs_it_and_the_error_goes(
    running_system: RunningSystem, browser: Browser
) -> None:
    room = "expired-tokens"
    problems = PageProblems()
    context, page = open_broadcaster(running_system, browser, problems, room)
    spoiled = hand_out_bad_tokens(page, expired)
    # The events stream is held until the failure has been seen: its snapshot (fresh tokens) would
    # otherwise repair the Stages before the test could look at the page.
    held: list[Route] = []
    page.route("**/api/rooms/*/publisher/events*", lambda route: held.append(route), times=1)

    page.click("#go-live")
    page.wait_for_function(
        f"window.fanoutBroadcast.stages.length === {STAGES}"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'errored')",
        timeout=15_000,
    )
    assert len(spoiled) == STAGES
    error = page.locator("#error")
    expect(error).to_be_visible()
    for entry in spoiled:
        stage_id = entry["stageArn"].rsplit("/", 1)[1]
        expect(error).to_contain_text(f"Stage {stage_id}: join failed: TOKEN_EXPIRED")
    expect(page.locator("#status")).to_contain_text(f"publishing to 0 of {STAGES} Stage(s)")
    screenshot(page, "broadcast-join-failed")

    # The snapshot brings fresh tokens: the page joins both Stages again and the red box goes.
    eventually_on(page, lambda: held, "the page to open the events stream")
    held[0].continue_()
    page.wait_for_function("window.fanoutBroadcast.events && window.fanoutBroadcast.events.snapshots === 1")
    assert_publishing_everywhere_without_error(running_system, page, room)
    rejoined = {s["stageArn"]: s["participantId"] for s in page.evaluate("window.fanoutBroadcast.stages")}
    assert rejoined.keys() == {e["stageArn"] for e in spoiled}
    assert not set(rejoined.values()) & {e["participantId"] for e in spoiled}, "joined with the old tokens"
    screenshot(page, "broadcast-repaired")

    stop(page)
    context.close()
    assert problems.errors == []


def test_a_join_refused_after_the_snapshot_came_is_retried_with_the_snapshot_token(
    running_system: RunningSystem, browser: Browser
) -> None:
    """The snapshot's fresh tokens can arrive while the first joins are still under way (a refusal
    takes a round trip to the Stage); the page must then use them when those joins fail."""
    room = "refused-tokens"
    problems = PageProblems()
    context, page = open_broadcaster(running_system, browser, problems, room)
    spoiled = hand_out_bad_tokens(page, badly_signed)

    # Every events socket goes through to the emulator; what the emulator says is held back until
    # the snapshot has been handled, so the refusal arrives after it, as on a slow network.
    joins: list[str] = []  # the token of each join frame the page sent
    refusals: list[dict[str, Any]] = []
    held: list[Callable[[], None]] = []
    released = False

    def through_emulator(page_side: WebSocketRoute) -> None:
        server = page_side.connect_to_server()

        def to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "join":
                joins.append(frame["token"])
            server.send(message)

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "error":
                refusals.append(frame)
            if released:
                page_side.send(message)
            else:
                held.append(lambda: page_side.send(message))

        def closed_by_server(code: int | None, reason: str | None) -> None:
            if released:
                page_side.close(code=code, reason=reason)
            else:
                held.append(lambda: page_side.close(code=code, reason=reason))

        page_side.on_message(to_server)
        server.on_message(to_page)
        server.on_close(closed_by_server)

    # The emulator serves each Stage's events socket (the tokens' events_url) beside its API.
    page.route_web_socket(
        f"{running_system.ivslocal_url.replace('http://', 'ws://', 1)}/events", through_emulator
    )

    page.click("#go-live")
    page.wait_for_function("window.fanoutBroadcast.events && window.fanoutBroadcast.events.snapshots === 1")
    eventually_on(page, lambda: len(refusals) == STAGES, "the emulator to refuse both badly signed tokens")
    assert {r["name"] for r in refusals} == {"TOKEN_NOT_ALLOWED"}, refusals
    # The snapshot was handled while both joins were still waiting for the emulator's answer.
    assert page.evaluate("window.fanoutBroadcast.stages.map((s) => s.publishState)") == ["joining"] * STAGES
    released = True
    for deliver in held:
        deliver()

    assert_publishing_everywhere_without_error(running_system, page, room)
    assert sorted(joins[:STAGES]) == sorted(e["token"] for e in spoiled)
    assert len(joins) == 2 * STAGES and not set(joins[STAGES:]) & set(joins[:STAGES]), "no second join"

    stop(page)
    context.close()
    assert problems.errors == []


def test_a_publish_report_that_finds_its_stage_gone_is_not_an_error(
    running_system: RunningSystem, browser: Browser
) -> None:
    """Scale-in or the end of the room can delete a Stage between the page's join and its report
    that it publishes there; the stage manager then answers 404, and the page has nothing to say."""
    room = "gone-under-report"
    problems = PageProblems()
    context, page = open_broadcaster(running_system, browser, problems, room)
    held: list[Route] = []
    page.route("**/api/rooms/*/publisher/status", lambda route: held.append(route))

    page.click("#go-live")
    page.wait_for_function(
        f"window.fanoutBroadcast.stages.length === {STAGES}"
        " && window.fanoutBroadcast.stages.every((s) => s.publishState === 'published')",
        timeout=20_000,
    )
    eventually_on(page, lambda: len(held) == STAGES, "the page to report publishing on each Stage")
    assert all(json.loads(route.request.post_data or "{}")["publishing"] is True for route in held)

    # The room ends while those reports are on their way; they arrive once it is gone.
    status, _ = running_system.api("DELETE", f"/api/rooms/{room}", key=running_system.publisher_key)
    assert status == 204
    page.wait_for_function("window.fanoutBroadcast.state === 'ended'", timeout=15_000)
    eventually(lambda: running_system.api("GET", f"/api/rooms/{room}")[0] == 404, f"room {room} gone")
    for route in held:
        stage_id = json.loads(route.request.post_data or "{}")["stageArn"].rsplit("/", 1)[1]
        # The page logs each report it gave up on, then (before the fix) showed it as an error.
        with page.expect_console_message(
            lambda message, stage_id=stage_id: (
                message.text.startswith("publisher status") and stage_id in message.text
            )
        ):
            route.continue_()
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("window.fanoutBroadcast.error") is None
    expect(page.locator("#status")).to_contain_text("was ended")

    context.close()
    assert problems.errors == []
