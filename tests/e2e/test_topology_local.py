"""Topology in local mode: the page publishes to one origin Stage, IVS replication (the emulator's)
feeds three replica Stages from it, and viewers on the replicas see the broadcaster's real video.

One origin, three replicas per origin, soft capacity 1 and one wanted free slot: each viewer who
arrives makes the autoscaler add a replica, which the stage manager feeds by
StartParticipantReplication and only then makes LIVE (placeable). A viewer who arrived while no LIVE
Stage had room would overflow onto a full one (below the hard limit) and stay there, so each viewer
opens its page once the room has a free LIVE Stage: what a steady audience meets, and the only order
in which the test can say where viewers land. A hard limit of 100 makes the topology the limit that
binds the room's ceiling (4 Stages x 100 viewers, under the region's 20,000).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.e2e.conftest import PageProblems, RunningSystem, screenshot, start_system
from tests.e2e.pages import (
    connected_participants,
    eventually,
    go_live_on_one_stage,
    open_broadcaster,
    wait_until_playing,
)

pytestmark = pytest.mark.e2e

ROOM = "main"
VIEWERS = 4
REPLICAS_PER_ORIGIN = 3
HARD_LIMIT = 100


@pytest.fixture(scope="module")
def topology_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    with start_system(
        tmp_path_factory.mktemp("topology"),
        FANOUT_DIRECT_STAGES="1",
        FANOUT_REPLICAS_PER_ORIGIN=str(REPLICAS_PER_ORIGIN),
        FANOUT_STAGE_CAPACITY="1",
        FANOUT_STAGE_HARD_LIMIT=str(HARD_LIMIT),
        FANOUT_MIN_STAGES="1",
        FANOUT_MIN_FREE_SLOTS="1",
    ) as system:
        yield system


def room_info(system: RunningSystem) -> dict[str, Any]:
    status, info = system.api("GET", f"/api/rooms/{ROOM}")
    assert status == 200, info
    return info


def free_live_stage(system: RunningSystem) -> dict[str, Any] | None:
    """A LIVE Stage below soft capacity (1): where the next viewer is placed."""
    return next(
        (s for s in room_info(system)["stages"] if s["state"] == "LIVE" and s["viewers"] < s["capacity"]),
        None,
    )


def fed_topology(system: RunningSystem) -> dict[str, Any] | None:
    """The room when it has one LIVE origin and every replica is LIVE with its replication ACTIVE."""
    info = room_info(system)
    origins = [s for s in info["stages"] if s["role"] == "origin"]
    replicas = [s for s in info["stages"] if s["role"] == "replica"]
    if len(origins) != 1 or origins[0]["state"] != "LIVE" or not replicas:
        return None
    if any(r["state"] != "LIVE" or r["replication"] != "ACTIVE" for r in replicas):
        return None
    return info


def replications(ivs: Any, origin_arn: str, participant_id: str) -> dict[str, str]:
    """destinationStageArn -> replicationState, as ListParticipantReplicas reports them."""
    found: dict[str, str] = {}
    kwargs = {"sourceStageArn": origin_arn, "participantId": participant_id}
    while True:
        answer = ivs.list_participant_replicas(**kwargs)
        for replica in answer["replicas"]:
            found[replica["destinationStageArn"]] = replica["replicationState"]
        if not answer.get("nextToken"):
            return found
        kwargs["nextToken"] = answer["nextToken"]


def test_one_origin_feeds_replicas_and_every_viewer_sees_the_broadcaster(
    topology_system: RunningSystem, browser: Browser
) -> None:
    started = time.monotonic()
    problems = PageProblems()
    ivs = topology_system.ivs()

    broadcaster_context, broadcaster = open_broadcaster(topology_system, browser, problems)
    go_live_on_one_stage(broadcaster)
    eventually(
        lambda: any(
            s["role"] == "origin" and s["state"] == "LIVE" for s in room_info(topology_system)["stages"]
        ),
        "the origin LIVE",
        within=20,
    )

    # Viewers arrive one after the other, each once a LIVE Stage has room for it.
    viewers: list[tuple[BrowserContext, Page]] = []
    playing: list[dict[str, Any]] = []
    for number in range(1, VIEWERS + 1):
        eventually(
            lambda: free_live_stage(topology_system),
            f"a LIVE Stage with room for viewer {number}",
            within=30,
        )
        context = browser.new_context(viewport={"width": 390, "height": 844})
        page = problems.watch(context.new_page())
        page.goto(f"{topology_system.base_url}/watch")
        viewers.append((context, page))
        playing.append(wait_until_playing(page))
    playing_after = time.monotonic() - started

    # The topology: one origin, the replicas it feeds, and the viewers mostly on replicas.
    info = eventually(lambda: fed_topology(topology_system), "every replica LIVE and fed", within=30)
    roles = {s["stageArn"]: s for s in info["stages"]}
    (origin,) = (s for s in info["stages"] if s["role"] == "origin")
    replicas = {arn: s for arn, s in roles.items() if s["role"] == "replica"}
    assert info["origins"] == 1 and info["replicas"] == len(replicas)
    assert 3 <= len(replicas) <= REPLICAS_PER_ORIGIN, info
    assert all(
        s["originIndex"] == origin["index"] and s["replicationError"] is None for s in replicas.values()
    ), info
    viewer_stages = [seen["stageArn"] for seen in playing]
    assert set(viewer_stages) <= set(roles), (viewer_stages, info)
    on_replicas = [arn for arn in viewer_stages if roles[arn]["role"] == "replica"]
    assert len(on_replicas) >= 3, (viewer_stages, info)
    for seen in playing:
        assert seen["width"] > 0 and seen["height"] > 0

    # The page has joined exactly one Stage, the origin, and publishes there.
    mine = broadcaster.evaluate("window.fanoutBroadcast.stages")
    assert [(s["stageArn"], s["publishState"]) for s in mine] == [(origin["stageArn"], "published")]
    publisher_id = mine[0]["participantId"]
    expect(broadcaster.locator("#publishing-count")).to_have_text("1")

    # The emulator agrees: the page is a publisher on the origin only; on each replica IVS shows its
    # copy (replicationType REPLICA, from the origin), and each viewer is connected where it was placed.
    joined_as_publisher = []
    for stage_arn, stage in roles.items():
        connected = connected_participants(ivs, stage_arn)
        publishers = {pid: p for pid, p in connected.items() if p.get("published")}
        own = {pid for pid, p in publishers.items() if p.get("replicationType") != "REPLICA"}
        if publisher_id in own:
            joined_as_publisher.append(stage_arn)
        if stage["role"] == "replica":
            copy = publishers.get(publisher_id)
            assert copy is not None, (stage_arn, connected)
            assert copy["replicationType"] == "REPLICA" and copy["sourceStageArn"] == origin["stageArn"], copy
            assert not own, (stage_arn, connected)  # nobody publishes into a replica itself
    assert joined_as_publisher == [origin["stageArn"]]
    for seen in playing:
        assert seen["participantId"] in connected_participants(ivs, seen["stageArn"])

    # IVS (the emulator, through boto3) has an ACTIVE replication from the origin into each replica.
    eventually(
        lambda: all(
            replications(ivs, origin["stageArn"], publisher_id).get(arn) == "ACTIVE" for arn in replicas
        ),
        "ListParticipantReplicas to show every replica ACTIVE",
    )
    listed = replications(ivs, origin["stageArn"], publisher_id)
    assert {arn for arn, state in listed.items() if state == "ACTIVE"} == set(replicas), listed

    # The broadcast page shows the topology: each replica, its origin, its ACTIVE replication, and the
    # room's ceiling with the limit that binds it.
    table = broadcaster.locator("#stages-body")
    table.scroll_into_view_if_needed()
    expect(table.locator("tr[data-role='origin']")).to_have_count(1, timeout=10_000)
    expect(table.locator("tr[data-role='replica'][data-replication='ACTIVE']")).to_have_count(
        len(replicas), timeout=10_000
    )
    for arn in replicas:
        row = table.locator(f"tr[data-stage-arn='{arn}']")
        expect(row.locator("[data-testid=stage-replication]")).to_have_text("ACTIVE")
        expect(row.locator("[data-testid=stage-role]")).to_contain_text(f"origin #{origin['index']}")
        expect(row.locator("[data-testid=stage-publish-state]")).to_have_text("—")
    origin_row = table.locator(f"tr[data-stage-arn='{origin['stageArn']}']")
    expect(origin_row.locator("[data-testid=stage-publish-state]")).to_have_text("published")
    expect(origin_row.locator("[data-testid=stage-replication]")).to_have_text(
        f"feeds {len(replicas)} replicas"
    )

    capacity = room_info(topology_system)["capacity"]
    assert capacity["bindingLimit"] == "topology", capacity
    assert capacity["ceilingStages"] == 1 + REPLICAS_PER_ORIGIN, capacity
    assert capacity["ceiling"] == (1 + REPLICAS_PER_ORIGIN) * HARD_LIMIT, capacity
    ceiling = broadcaster.locator("#room-ceiling")
    expect(ceiling).to_be_visible()
    expect(ceiling).to_have_attribute("data-binding-limit", "topology")
    expect(ceiling).to_contain_text(
        f"Ceiling: {capacity['ceiling']} viewer(s) on {capacity['ceilingStages']} Stage(s)"
    )
    expect(ceiling.locator("[data-testid=binding-limit]")).to_have_text("topology")
    expect(ceiling.locator("[data-testid=binding-limit]")).to_have_attribute(
        "title", capacity["bindingLimitDescription"]
    )
    expect(ceiling.locator("[data-testid=binding-limit-description]")).to_have_text(
        capacity["bindingLimitDescription"]
    )
    expect(broadcaster.locator("#room-summary")).to_contain_text(
        f"{VIEWERS} viewer(s) on {len(roles)} Stage(s) (1 origin(s), {len(replicas)} replica(s))",
        timeout=10_000,
    )
    screenshot(broadcaster, "broadcast-topology")

    # Still playing now that the whole topology is in place.
    for _, page in viewers:
        wait_until_playing(page)
    assert broadcaster.evaluate("window.fanoutBroadcast.error") is None

    for context, _ in viewers:
        context.close()
    broadcaster_context.close()
    assert problems.errors == []
    print(
        f"\nviewers on {[roles[arn]['role'] for arn in viewer_stages]}; {len(replicas)} replica(s) ACTIVE;"
        f" all playing after {playing_after:.1f}s, checked after {time.monotonic() - started:.1f}s"
    )
