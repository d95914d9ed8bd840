"""`make bench`, join-storm scenario: 5,000 new viewers in 10 s, once per fan-out topology.

Two fresh local systems, one after the other, each with soft capacity 1,000 (so the storm fills what
one origin and five replicas plan for, 6,000), hard limit 10,000, autoscaler on, IVS call budget 5/s
per operation, and the other capacity settings at their defaults:

- topology: one origin the broadcaster publishes to, feeding up to 5 replicas by IVS server-side
  replication (FANOUT_DIRECT_STAGES=1, FANOUT_REPLICAS_PER_ORIGIN=5, the defaults). A replica takes
  viewers only once the stage manager has replicated the broadcaster's participant into it, which it
  does only when IVS (the emulator) shows that participant publishing on the origin;
- browser fan-out: the page publishes to every Stage itself (FANOUT_REPLICAS_PER_ORIGIN=0), with a
  direct budget as large as the room's Stage cap (FANOUT_DIRECT_STAGES=200), as before the topology.

In both the broadcaster (tools/ivs_publisher.py) follows the publisher event stream and really joins
and publishes on every origin over the emulator's events socket, then reports publishing with its
participant id, as the broadcast page does. The load is open loop (500 new viewers a second on a fixed
schedule), so a slow answer never slows the storm. Printed per scenario: placed and refused viewers,
token latency percentiles measured from each request's scheduled time, Stages created and how fast
(first seen in room info, sampled every 0.25 s), the peak overflow (viewers beyond soft capacity), the
LIVE Stages over time, then the reach: the Stages the broadcaster publishes to (direct) against the
Stages it reaches (LIVE origins and replicas; IVS's own count of active replications beside it), Stages
per 1,000 viewers, and the room's binding limit and ceiling from GET /api/rooms/{room}. A table at the
end puts the scenarios side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from services.common.ivs_calls import make_ivs_client
from tools.bench_system import BENCH_FAILURES, ROOM, BenchSystem
from tools.ivs_publisher import IvsPublisher, PublishedStage
from tools.loadgen import LoadGenerator, LoadResult, OpenLoopJob, describe_errors, percentile
from tools.local_system import HOST

VIEWERS = 5_000
STORM_SECONDS = 10.0
SOFT_CAPACITY = 1_000
HARD_LIMIT = 10_000
COMMON_SETTINGS = {
    "FANOUT_MIN_STAGES": "1",
    "FANOUT_STAGE_CAPACITY": str(SOFT_CAPACITY),
    "FANOUT_STAGE_HARD_LIMIT": str(HARD_LIMIT),
}
SAMPLE_SECONDS = 0.25
# The broadcaster must be publishing on the first origin before the doors open.
BROADCASTER_READY_SECONDS = 15.0
# The pool keeps growing after the last join: watch it catch up for a few seconds.
CATCH_UP_SECONDS = 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    settings: dict[str, str]


SCENARIOS = (
    Scenario(
        "topology 1 x 5",
        "1 origin x 5 replicas (FANOUT_DIRECT_STAGES=1, FANOUT_REPLICAS_PER_ORIGIN=5)",
        {**COMMON_SETTINGS, "FANOUT_DIRECT_STAGES": "1", "FANOUT_REPLICAS_PER_ORIGIN": "5"},
    ),
    Scenario(
        "browser fan-out",
        "the page publishes to every Stage (FANOUT_REPLICAS_PER_ORIGIN=0, FANOUT_DIRECT_STAGES=200)",
        {**COMMON_SETTINGS, "FANOUT_DIRECT_STAGES": "200", "FANOUT_REPLICAS_PER_ORIGIN": "0"},
    ),
)


@dataclass
class PoolWatch:
    """What room info showed while the storm ran."""

    peak_overflow: int = 0
    peak_stage_viewers: int = 0
    # Stage ARN -> when room info first showed it (s after the start).
    first_seen: dict[str, float] = field(default_factory=dict)
    # (t, viewers, LIVE Stages, LIVE replicas)
    live_counts: list[tuple[float, int, int, int]] = field(default_factory=list)

    def add(self, elapsed: float, room: dict[str, Any]) -> None:
        stages = [s for s in room.get("stages", []) if s.get("stageArn")]
        for stage in stages:
            self.first_seen.setdefault(stage["stageArn"], elapsed)
        overflow = sum(max(0, s["viewers"] - s["capacity"]) for s in stages)
        self.peak_overflow = max(self.peak_overflow, overflow)
        self.peak_stage_viewers = max([self.peak_stage_viewers, *(s["viewers"] for s in stages)])
        live = [s for s in stages if s["state"] == "LIVE"]
        replicas = sum(1 for s in live if s.get("role") == "replica")
        self.live_counts.append((elapsed, int(room.get("viewers", 0)), len(live), replicas))


@dataclass
class StormOutcome:
    """The storm's load result, the Stages there before it, the room throughout and at the end, and
    what the broadcaster published on."""

    result: LoadResult
    storm_end: float
    initial: set[str]
    watch: PoolWatch
    final: dict[str, Any]
    published: dict[str, PublishedStage]
    problems: list[str]
    # Active replications IVS (the emulator) lists for the broadcaster's participants; None if unknown.
    ivs_replications: int | None


@dataclass(frozen=True)
class Reach:
    """One scenario's row of the summary table."""

    scenario: str
    viewers: int
    refused: int
    stages: int
    direct: int
    reached: int
    binding_limit: str
    ceiling: int | None

    @property
    def stages_per_thousand(self) -> float:
        return self.stages * 1000 / self.viewers if self.viewers else float("nan")


async def watch_pool(base: str, watch: PoolWatch, started: float, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.get(f"{base}/api/rooms/{ROOM}") as response:
                if response.status == 200:
                    watch.add(time.monotonic() - started, await response.json())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


async def count_ivs_replications(system: BenchSystem, published: dict[str, PublishedStage]) -> int | None:
    """Active replications of the broadcaster's participants, as IVS (the emulator) lists them."""
    client = make_ivs_client("us-east-1", f"http://{HOST}:{system.ports.ivslocal}", local_credentials=True)

    def count() -> int:
        active = 0
        for stage in published.values():
            answer = client.list_participant_replicas(
                sourceStageArn=stage.stage_arn, participantId=stage.participant_id
            )
            active += sum(1 for r in answer.get("replicas", []) if r.get("replicationState") == "ACTIVE")
        return active

    try:
        return await asyncio.to_thread(count)
    except (BotoCoreError, ClientError):
        return None


async def storm(system: BenchSystem, generator: LoadGenerator) -> StormOutcome:
    """The storm, with the broadcaster publishing and the pool watched until it has caught up."""
    async with IvsPublisher(system.base, system.publisher_key, ROOM) as publisher:
        await publisher.wait_publishing(1, BROADCASTER_READY_SECONDS)
        initial = {s["stageArn"] for s in (await system.room())["stages"] if s.get("stageArn")}
        started = time.monotonic()
        watch = PoolWatch()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_pool(system.base, watch, started, stop))
        try:
            rate = VIEWERS / STORM_SECONDS
            job = OpenLoopJob(system.viewer_url, rate, 0.0, STORM_SECONDS, f"s-{secrets.token_hex(3)}")
            result = await generator.run(job)
            storm_end = time.monotonic() - started
            await asyncio.sleep(CATCH_UP_SECONDS)
            stop.set()
            final = await system.room()
            watch.add(time.monotonic() - started, final)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        published = publisher.published
        replications = await count_ivs_replications(system, published)
        return StormOutcome(
            result, storm_end, initial, watch, final, published, list(publisher.problems), replications
        )


def print_storm(outcome: StormOutcome) -> None:
    result, final, watch = outcome.result, outcome.final, outcome.watch
    latencies = sorted(result.latencies_ms)
    stages = [s for s in final["stages"] if s.get("stageArn")]
    live = sum(1 for s in stages if s["state"] == "LIVE")
    needed = -(-final["viewers"] // SOFT_CAPACITY)
    added = sorted(t for arn, t in watch.first_seen.items() if arn not in outcome.initial)
    print(f"   placed {len(latencies):,}, refused {describe_errors(result.errors)} (of {result.sent:,} sent)")
    print(
        f"   token latency from scheduled send: p50 {percentile(latencies, 0.5):.1f} ms, "
        f"p90 {percentile(latencies, 0.9):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
        f"max {latencies[-1] if latencies else float('nan'):.1f} ms"
    )
    during = [t for t in added if t <= outcome.storm_end]
    print(
        f"   Stages created: {len(added)} ({len(during)} during the storm, first seen after "
        f"{added[0] if added else float('nan'):.1f} s); at the end {len(stages)} Stages, {live} LIVE, "
        f"for {final['viewers']:,} viewers ({needed} needed at soft capacity)"
    )
    print(
        f"   peak overflow {watch.peak_overflow:,} viewers beyond soft capacity; busiest Stage "
        f"{watch.peak_stage_viewers:,} viewers (hard limit {HARD_LIMIT:,})"
    )
    for elapsed, viewers, live_stages, live_replicas in watch.live_counts[
        :: max(1, len(watch.live_counts) // 8)
    ]:
        print(
            f"     t={elapsed:5.1f} s  viewers {viewers:>5,}  LIVE Stages {live_stages:>3} "
            f"(replicas {live_replicas})  capacity {live_stages * SOFT_CAPACITY:>6,}"
        )


def reach_of(scenario: Scenario, outcome: StormOutcome) -> Reach:
    final = outcome.final
    stages = [s for s in final["stages"] if s.get("stageArn") and s["state"] != "DELETING"]
    capacity = final.get("capacity") or {}
    return Reach(
        scenario=scenario.name,
        viewers=int(final["viewers"]),
        refused=sum(outcome.result.errors.values()),
        stages=len(stages),
        direct=len(outcome.published),
        reached=sum(1 for s in stages if s["state"] == "LIVE"),
        binding_limit=str(capacity.get("bindingLimit")),
        ceiling=capacity.get("ceiling"),
    )


def print_reach(reach: Reach, outcome: StormOutcome) -> None:
    final = outcome.final
    stages = [s for s in final["stages"] if s.get("stageArn") and s["state"] != "DELETING"]
    live_origins = sum(1 for s in stages if s["state"] == "LIVE" and s.get("role") != "replica")
    live_replicas = reach.reached - live_origins
    ivs = (
        "IVS's count unavailable"
        if outcome.ivs_replications is None
        else f"IVS lists {outcome.ivs_replications} active replication(s) of its participant(s)"
    )
    print(
        f"   reach: the broadcaster publishes to {reach.direct} Stage(s) and reaches {reach.reached} "
        f"({live_origins} origin(s) + {live_replicas} replica(s) LIVE; room info shows "
        f"{final.get('origins')} origin(s), {final.get('replicas')} replica(s); {ivs})"
    )
    capacity = final.get("capacity") or {}
    ceiling = capacity.get("ceiling")
    print(
        f"   {reach.stages_per_thousand:.2f} Stages per 1,000 viewers; binding limit {reach.binding_limit}, "
        f"ceiling {ceiling if ceiling is None else f'{ceiling:,}'} viewers on "
        f"{capacity.get('ceilingStages')} Stage(s); room info says: {capacity.get('bindingLimitDescription')}"
    )
    for problem in outcome.problems:
        print(f"   broadcaster problem: {problem}")
    not_fed = [s for s in stages if s.get("role") == "replica" and s["state"] != "LIVE"]
    for stage in not_fed:
        print(
            f"   WARNING: replica Stage {stage.get('index')} is {stage['state']} (replication "
            f"{stage.get('replication')}: {stage.get('replicationError') or 'no error'})"
        )


def print_summary(rows: list[Reach]) -> None:
    print(
        f"\n   {'scenario':<16} {'viewers':>7} {'refused':>7} {'Stages':>6} {'per 1,000':>9} "
        f"{'direct':>6} {'reached':>7}  binding limit (ceiling)"
    )
    for row in rows:
        ceiling = "?" if row.ceiling is None else f"{row.ceiling:,}"
        print(
            f"   {row.scenario:<16} {row.viewers:>7,} {row.refused:>7,} {row.stages:>6} "
            f"{row.stages_per_thousand:>9.2f} {row.direct:>6} {row.reached:>7}  "
            f"{row.binding_limit} ({ceiling})"
        )


async def run_scenario(label: str, scenario: Scenario, keep: bool) -> tuple[int, Reach | None]:
    """One scenario on a fresh system: (0 when any viewer was placed, its summary row).
    The logs are kept when any viewer was refused, or with `keep`."""
    print(f"\n 6{label}. {scenario.name}: {scenario.description}")
    system: BenchSystem | None = None
    generator: LoadGenerator | None = None
    succeeded = False
    try:
        system = BenchSystem("fanout-storm-", scenario.settings)
        await system.start()
        await system.publisher_tokens()
        generator = LoadGenerator()
        outcome = await storm(system, generator)
        print_storm(outcome)
        reach = reach_of(scenario, outcome)
        print_reach(reach, outcome)
        succeeded = reach.refused == 0 and not outcome.problems
        return (0 if outcome.result.latencies_ms else 1), reach
    except BENCH_FAILURES as error:
        print(f"\nbench: storm ({scenario.name}) failed: {error}", file=sys.stderr)
        return 1, None
    finally:
        if generator is not None:
            generator.close()
        if system is not None:
            await system.stop()
            if not succeeded or keep:
                print(f"   the storm's services' logs are in {system.log_path}")
            else:
                system.remove_state_dir()


async def run_storm(keep: bool) -> int:
    """Step 6, every scenario; 0 when each placed any viewer."""
    print(
        f"\n6. join storm: {VIEWERS:,} new viewers in {STORM_SECONDS:.0f} s (open loop) per scenario, soft "
        f"capacity {SOFT_CAPACITY:,}, autoscaler on, a broadcaster that joins and publishes on its Stages "
        "over the emulator's events socket"
    )
    code = 0
    rows: list[Reach] = []
    for label, scenario in zip("ab", SCENARIOS, strict=True):
        scenario_code, reach = await run_scenario(label, scenario, keep)
        code = max(code, scenario_code)
        if reach is not None:
            rows.append(reach)
    if rows:
        print_summary(rows)
    return code
