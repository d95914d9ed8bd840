"""Scale-out in local mode: viewers grow the pool and the broadcast page follows without a reload.

Soft capacity 1 and one wanted free slot: every viewer who arrives makes the autoscaler create a
Stage, the publisher events stream announces it, the page joins and publishes there (which makes it
LIVE), and the next viewer is placed on it. When the viewers leave, scale-in deletes Stages and the
page leaves them on `stage-removed`.

The autoscaler also provisions ahead of the join rate (join rate x lead time, 3 s by default until a
Stage made during the show was measured), so a viewer who joins right after the autoscaler first
looked at the room, which a busy machine makes likely, brings several Stages at once, and the
surplus is drained again 2 s later, while viewers are still arriving. So the pool can change under
any check here: each check reads one consistent state (or waits for one), and none assumes which
Stage comes or goes, or when.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from botocore.exceptions import ClientError
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect

from tests.e2e.conftest import BROWSER_FAN_OUT, PageProblems, RunningSystem, screenshot, start_system
from tests.e2e.pages import connected_participants, eventually, navigate_away, wait_until_playing

pytestmark = pytest.mark.e2e

ROOM = "main"
VIEWERS = 3


@pytest.fixture(scope="module")
def scaling_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    with start_system(
        tmp_path_factory.mktemp("scale-out"),
        FANOUT_STAGE_CAPACITY="1",
        FANOUT_MIN_STAGES="1",
        FANOUT_MIN_FREE_SLOTS="1",
        # Fast scale-in, so the test also sees Stages deleted under the broadcaster.
        FANOUT_SCALE_IN_COOLDOWN_SECONDS="2",
        FANOUT_JOIN_RATE_WINDOW_SECONDS="3",
        **BROWSER_FAN_OUT,
    ) as system:
        yield system


def room_info(system: RunningSystem) -> dict[str, Any]:
    status, info = system.api("GET", f"/api/rooms/{ROOM}")
    assert status == 200, info
    return info


def room_stages(system: RunningSystem) -> dict[str, str]:
    """stageArn -> state for the room's Stages that are not on their way out."""
    return {s["stageArn"]: s["state"] for s in room_info(system)["stages"] if s["state"] != "DELETING"}


def broadcaster_stages(page: Page) -> dict[str, dict[str, Any]]:
    return {s["stageArn"]: s for s in page.evaluate("window.fanoutBroadcast.stages")}


def publishing_everywhere(system: RunningSystem, page: Page) -> dict[str, str] | None:
    """The room's Stages when the page publishes on each of them and each is LIVE, else None."""
    stages = room_stages(system)
    mine = broadcaster_stages(page)
    if set(mine) != set(stages) or any(s["publishState"] != "published" for s in mine.values()):
        return None
    if any(state not in ("LIVE", "DRAINING") for state in stages.values()):
        return None
    return stages


def page_publishes_on_all_it_holds(page: Page) -> None:
    """Waits until the page publishes on every Stage it holds and its summary and table say so."""
    page.wait_for_function(
        """() => {
            const stages = window.fanoutBroadcast.stages;
            const row = (arn) => [...document.querySelectorAll('#stages-body tr[data-stage-arn]')]
                .find((tr) => tr.dataset.stageArn === arn);
            const cell = (arn) => row(arn) && row(arn).querySelector('[data-testid=stage-publish-state]');
            return stages.length > 0 && stages.every((s) => s.publishState === 'published')
                && document.querySelector('#publishing-count').textContent === String(stages.length)
                && stages.every((s) => cell(s.stageArn) && cell(s.stageArn).textContent === 'published');
        }""",
        timeout=20_000,
        polling=200,
    )


def emulator_sees_the_publisher_everywhere(ivs: Any, page: Page) -> dict[str, dict[str, Any]] | None:
    """The page's Stages when, on each, the emulator has its participant CONNECTED and published."""
    mine = broadcaster_stages(page)
    for stage_arn, stage in mine.items():
        try:
            connected = connected_participants(ivs, stage_arn)
        except ClientError as error:
            if error.response["Error"]["Code"] == "ResourceNotFoundException":
                return None  # drained and deleted between the two reads; read the page again
            raise
        if not connected.get(stage["participantId"], {}).get("published"):
            return None
    return mine


def stage_exists(ivs: Any, stage_arn: str) -> bool:
    try:
        ivs.get_stage(arn=stage_arn)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ResourceNotFoundException":
            return False
        raise
    return True


def test_sse_parser_handles_split_chunks_comments_and_line_endings(
    scaling_system: RunningSystem, browser: Browser
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{scaling_system.base_url}/")
    parsed = page.evaluate(
        """async () => {
            const { SseParser } = await import('/static/js/sse.js');
            const parser = new SseParser();
            const chunks = [': keep-alive\\n\\n', 'event: snap', 'shot\\r', '\\ndata: {"a":',
                '1}\\r\\n\\r\\n', 'data: one\\ndata:two\\n\\n',
                'event: empty\\n\\n', 'event: x\\rdata: y\\r\\r', 'data: tail'];
            return chunks.flatMap((chunk) => parser.feed(chunk));
        }"""
    )
    context.close()
    assert [(e["event"], e["data"]) for e in parsed] == [
        ("snapshot", '{"a":1}'),
        ("message", "one\ntwo"),
        ("x", "y"),
    ]


def test_viewers_grow_the_pool_and_the_broadcaster_follows_without_reload(
    scaling_system: RunningSystem, browser: Browser
) -> None:
    started = time.monotonic()
    problems = PageProblems()
    ivs = scaling_system.ivs()

    broadcaster_context = browser.new_context(viewport={"width": 1280, "height": 900})
    broadcaster = problems.watch(broadcaster_context.new_page())
    broadcaster.goto(f"{scaling_system.base_url}/broadcast")
    broadcaster.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    broadcaster.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    broadcaster.fill("#publisher-key", scaling_system.publisher_key)
    broadcaster.click("#go-live")
    broadcaster.wait_for_function(
        "window.fanoutBroadcast.events && window.fanoutBroadcast.events.state === 'open'"
        " && window.fanoutBroadcast.stages.length === 1"
        " && window.fanoutBroadcast.stages[0].publishState === 'published'",
        timeout=15_000,
    )
    first = eventually(lambda: publishing_everywhere(scaling_system, broadcaster), "the first Stage LIVE")
    assert len(first) == 1
    expect(broadcaster.locator("#publishing-count")).to_have_text("1")

    # Viewers arrive one after the other; each takes a Stage and makes the pool grow by at least one.
    viewers: list[tuple[BrowserContext, Page]] = []
    playing: list[dict[str, Any]] = []
    pool_sizes = [len(first)]

    def grown_past(count: int) -> dict[str, str] | None:
        found = publishing_everywhere(scaling_system, broadcaster)
        return found if found and len(found) > count else None

    for number in range(1, VIEWERS + 1):
        context = browser.new_context(viewport={"width": 390, "height": 844})
        page = problems.watch(context.new_page())
        page.goto(f"{scaling_system.base_url}/watch")
        viewers.append((context, page))
        playing.append(wait_until_playing(page))
        stages = eventually(
            partial(grown_past, number),
            f"the pool to grow past {number} Stage(s) with the broadcaster publishing on each",
            within=30,
        )
        pool_sizes.append(len(stages))
    grown_after = time.monotonic() - started

    assert broadcaster.evaluate("window.__sameDocument") is True, "the broadcast page reloaded"
    events = broadcaster.evaluate("window.fanoutBroadcast.events")
    assert events["snapshots"] >= 1 and events["added"] >= VIEWERS and events["reconnects"] == 0, events
    expect(broadcaster.locator("#events-state")).to_have_attribute("data-state", "open")
    page_publishes_on_all_it_holds(broadcaster)

    # Soft capacity 1: every viewer is on a Stage of its own, and the broadcaster is on all of them.
    # (Scale-in only drains empty Stages, so the viewers' Stages stay while they watch.)
    viewer_stages = [seen["stageArn"] for seen in playing]
    assert len(set(viewer_stages)) == VIEWERS, viewer_stages
    assert set(viewer_stages) <= set(broadcaster_stages(broadcaster))
    for seen in playing:
        assert seen["width"] > 0 and seen["height"] > 0
    # Still playing after the pool changed around them.
    for _, page in viewers:
        wait_until_playing(page)

    # The emulator agrees: on every Stage the publisher is CONNECTED and published.
    eventually(
        lambda: emulator_sees_the_publisher_everywhere(ivs, broadcaster),
        "the emulator to see the publisher published on every Stage the page holds",
    )
    for seen in playing:
        assert seen["participantId"] in connected_participants(ivs, seen["stageArn"])

    broadcaster.locator("#stages-table").scroll_into_view_if_needed()
    expect(broadcaster.locator("#room-summary")).to_contain_text(f"{VIEWERS} viewer(s)", timeout=10_000)
    screenshot(broadcaster, "broadcast-scaled-out")

    # The viewers leave; scale-in deletes Stages and the page leaves them as they are removed. With
    # every viewer gone, scale-in keeps at most 1 + 2 x 1 free slots, fewer than the page holds now.
    held = set(broadcaster_stages(broadcaster))
    assert len(held) > VIEWERS, held
    for _, page in viewers:
        navigate_away(page)
    eventually(lambda: room_info(scaling_system)["viewers"] == 0, "every viewer gone", within=15)
    for context, _ in viewers:
        context.close()

    def left_after_scale_in() -> tuple[dict[str, str], set[str]] | None:
        stages = publishing_everywhere(scaling_system, broadcaster)
        gone = held - set(stages) if stages else set()
        return (stages, gone) if stages and gone else None

    remaining, removed = eventually(
        left_after_scale_in,
        "scale-in to delete a Stage and the page to publish on exactly the Stages left",
        within=30,
    )
    broadcaster.wait_for_function(
        f"window.fanoutBroadcast.events.removed >= {len(removed)}", timeout=15_000, polling=200
    )
    eventually(
        lambda: not any(stage_exists(ivs, arn) for arn in removed), "the removed Stages deleted", within=15
    )
    assert broadcaster.evaluate("window.fanoutBroadcast.error") is None
    expect(broadcaster.locator("#error")).to_be_hidden()
    page_publishes_on_all_it_holds(broadcaster)
    shrunk_after = time.monotonic() - started
    events = broadcaster.evaluate("window.fanoutBroadcast.events")

    # Stop closes the stream and leaves the rest.
    broadcaster.click("#stop")
    broadcaster.wait_for_function(
        "window.fanoutBroadcast.state === 'idle' && window.fanoutBroadcast.stages.length === 0"
        " && window.fanoutBroadcast.events === null"
    )
    eventually(
        lambda: all(state == "STANDBY" for state in room_stages(scaling_system).values()),
        "STANDBY",
        within=20,
    )
    broadcaster_context.close()
    assert problems.errors == []
    print(
        f"\npool sizes as viewers arrived {pool_sizes}; viewers on {len(set(viewer_stages))} Stages;"
        f" grown after {grown_after:.1f}s; events {events};"
        f" {len(removed)} Stage(s) removed, {len(remaining)} left after {shrunk_after:.1f}s"
    )


def test_the_broadcaster_reconnects_after_a_drop_and_stops_when_the_room_ends(
    scaling_system: RunningSystem, browser: Browser
) -> None:
    problems = PageProblems()
    context = browser.new_context()
    broadcaster = problems.watch(context.new_page())
    opened: list[str] = []

    def events_route(route: Route) -> None:
        opened.append(route.request.url)
        if len(opened) == 1:  # the first stream says what a stage manager restart says, then ends
            route.fulfill(
                status=200,
                headers={"Content-Type": "text/event-stream"},
                body=': keep-alive\n\nevent: unavailable\ndata: {"message":"test drop"}\n\n',
            )
        else:
            route.continue_()

    broadcaster.route("**/api/rooms/*/publisher/events*", events_route)
    broadcaster.goto(f"{scaling_system.base_url}/broadcast")
    broadcaster.wait_for_function("document.querySelector('#preview').videoWidth > 0")
    broadcaster.fill("#publisher-key", scaling_system.publisher_key)
    broadcaster.click("#go-live")
    broadcaster.wait_for_function(
        "window.fanoutBroadcast.events && window.fanoutBroadcast.events.state === 'open'", timeout=15_000
    )
    events = broadcaster.evaluate("window.fanoutBroadcast.events")
    assert events["reconnects"] == 1 and events["lastDrop"] == "test drop" and events["snapshots"] == 1
    assert len(opened) == 2
    # The previous test may leave scale-in under way: the pool can still shrink while this one runs.
    eventually(lambda: publishing_everywhere(scaling_system, broadcaster), "live on every Stage")
    page_publishes_on_all_it_holds(broadcaster)

    # Ending the room: the stream says room-ended, the page leaves every Stage and says so.
    status, _ = scaling_system.api("DELETE", f"/api/rooms/{ROOM}", key=scaling_system.publisher_key)
    assert status == 204
    broadcaster.wait_for_function(
        "window.fanoutBroadcast.state === 'ended' && window.fanoutBroadcast.stages.length === 0",
        timeout=10_000,
    )
    expect(broadcaster.locator("#status")).to_contain_text("was ended")
    expect(broadcaster.locator("#go-live")).to_be_enabled()
    # No reconnect after the room ended: "ended" is the stream's last state (a reconnect would have
    # replaced it with "reconnecting" in the same task), and no third stream was asked for.
    expect(broadcaster.locator("#events-state")).to_have_attribute("data-state", "ended")
    assert broadcaster.evaluate("window.fanoutBroadcast.events.state") == "ended"
    assert len(opened) == 2
    assert broadcaster.evaluate("window.fanoutBroadcast.error") is None
    context.close()
    assert problems.errors == []
