"""`make bench`, join-storm scenario: 5,000 new viewers in 10 s against the design's defaults.

A fresh local system (soft capacity 50, hard limit 10,000, autoscaler on, IVS call budget 5/s per
operation) and a stand-in broadcaster that follows the publisher event stream and reports publishing
on every Stage it is given, as the broadcast page does. The load is open loop (500 new viewers a
second on a fixed schedule), so a slow answer never slows the storm. Printed: placed and refused
viewers, Stages created and how fast, the peak overflow (viewers beyond soft capacity, sampled from
room info every 0.25 s), and token latency percentiles measured from each request's scheduled time.
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

from tools.bench_system import BENCH_FAILURES, ROOM, BenchSystem
from tools.loadgen import LoadGenerator, LoadResult, OpenLoopJob, describe_errors, percentile
from tools.sse_client import read_events

VIEWERS = 5_000
STORM_SECONDS = 10.0
SOFT_CAPACITY = 50
HARD_LIMIT = 10_000
SETTINGS = {
    "FANOUT_MIN_STAGES": "1",
    "FANOUT_STAGE_CAPACITY": str(SOFT_CAPACITY),
    "FANOUT_STAGE_HARD_LIMIT": str(HARD_LIMIT),
}
SAMPLE_SECONDS = 0.25
# The broadcaster is live on the first Stage before the doors open.
BROADCASTER_HEAD_START_SECONDS = 0.5
# The pool keeps growing after the last join: watch it catch up for a few seconds.
CATCH_UP_SECONDS = 5.0


@dataclass
class PoolWatch:
    """What room info showed while the storm ran."""

    peak_overflow: int = 0
    peak_stage_viewers: int = 0
    stages_seen: set[str] = field(default_factory=set)
    live_counts: list[tuple[float, int, int]] = field(default_factory=list)  # (t, viewers, LIVE Stages)

    def add(self, elapsed: float, room: dict[str, Any]) -> None:
        stages = [s for s in room.get("stages", []) if s.get("stageArn")]
        self.stages_seen.update(s["stageArn"] for s in stages)
        overflow = sum(max(0, s["viewers"] - s["capacity"]) for s in stages)
        self.peak_overflow = max(self.peak_overflow, overflow)
        self.peak_stage_viewers = max([self.peak_stage_viewers, *(s["viewers"] for s in stages)])
        live = sum(1 for s in stages if s["state"] == "LIVE")
        self.live_counts.append((elapsed, int(room.get("viewers", 0)), live))


@dataclass
class StormOutcome:
    """The storm's load result, when Stages were added (s after the start), and the room throughout."""

    result: LoadResult
    storm_end: float
    added: list[float]
    watch: PoolWatch
    final: dict[str, Any]


async def follow_as_broadcaster(base: str, key: str, added: list[float], started: float) -> None:
    """Reads the publisher event stream and reports publishing on every Stage it names."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,
        http.get(f"{base}/api/rooms/{ROOM}/publisher/events", headers=headers) as stream,
    ):
        async for event, data in read_events(stream):
            tokens = data["tokens"] if event == "snapshot" else [data] if event == "stage-added" else []
            if event == "stage-added":
                added.append(time.perf_counter() - started)
            for token in tokens:
                async with http.post(
                    f"{base}/api/rooms/{ROOM}/publisher/status",
                    json={"stageArn": token["stageArn"], "publishing": True},
                    headers=headers,
                ) as response:
                    await response.read()


async def watch_pool(base: str, watch: PoolWatch, started: float, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.get(f"{base}/api/rooms/{ROOM}") as response:
                if response.status == 200:
                    watch.add(time.perf_counter() - started, await response.json())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


async def storm(system: BenchSystem, generator: LoadGenerator) -> StormOutcome:
    """The storm, with the broadcaster following and the pool watched until it has caught up."""
    started = time.perf_counter()
    added: list[float] = []
    watch = PoolWatch()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(follow_as_broadcaster(system.base, system.publisher_key, added, started)),
        asyncio.create_task(watch_pool(system.base, watch, started, stop)),
    ]
    try:
        await asyncio.sleep(BROADCASTER_HEAD_START_SECONDS)
        rate = VIEWERS / STORM_SECONDS
        job = OpenLoopJob(system.viewer_url, rate, 0.0, STORM_SECONDS, f"s-{secrets.token_hex(3)}")
        result = await generator.run(job)
        storm_end = time.perf_counter() - started
        await asyncio.sleep(CATCH_UP_SECONDS)
        stop.set()
        final = await system.room()
        watch.add(time.perf_counter() - started, final)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return StormOutcome(result, storm_end, added, watch, final)


def print_storm(outcome: StormOutcome) -> None:
    result, final, watch, added = outcome.result, outcome.final, outcome.watch, outcome.added
    latencies = sorted(result.latencies_ms)
    stages = [s for s in final["stages"] if s.get("stageArn")]
    live = sum(1 for s in stages if s["state"] == "LIVE")
    needed = -(-final["viewers"] // SOFT_CAPACITY)
    print(f"   placed {len(latencies):,}, refused {describe_errors(result.errors)} (of {result.sent:,} sent)")
    print(
        f"   token latency from scheduled send: p50 {percentile(latencies, 0.5):.1f} ms, "
        f"p90 {percentile(latencies, 0.9):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
        f"max {latencies[-1] if latencies else float('nan'):.1f} ms"
    )
    during = [t for t in added if t <= outcome.storm_end]
    print(
        f"   Stages created: {len(added)} ({len(during)} during the storm, first after "
        f"{added[0] if added else float('nan'):.1f} s); at the end {len(stages)} Stages, {live} LIVE, "
        f"for {final['viewers']:,} viewers ({needed} needed at soft capacity)"
    )
    print(
        f"   peak overflow {watch.peak_overflow:,} viewers beyond soft capacity; busiest Stage "
        f"{watch.peak_stage_viewers:,} viewers (hard limit {HARD_LIMIT:,})"
    )
    for elapsed, viewers, live_stages in watch.live_counts[:: max(1, len(watch.live_counts) // 8)]:
        print(
            f"     t={elapsed:5.1f} s  viewers {viewers:>5,}  LIVE Stages {live_stages:>3}  "
            f"capacity {live_stages * SOFT_CAPACITY:>5,}"
        )


async def run_storm(keep: bool) -> int:
    """Step 6; 0 when any viewer was placed. The logs are kept when any was refused, or with `keep`."""
    print(
        f"\n6. join storm: {VIEWERS:,} new viewers in {STORM_SECONDS:.0f} s (open loop), soft capacity "
        f"{SOFT_CAPACITY}, autoscaler on, a broadcaster following the event stream"
    )
    system: BenchSystem | None = None
    generator: LoadGenerator | None = None
    succeeded = False
    try:
        system = BenchSystem("fanout-storm-", SETTINGS)
        await system.start()
        await system.publisher_tokens()
        generator = LoadGenerator()
        outcome = await storm(system, generator)
        print_storm(outcome)
        succeeded = sum(outcome.result.errors.values()) == 0
        return 0 if outcome.result.latencies_ms else 1
    except BENCH_FAILURES as error:
        print(f"\nbench: storm failed: {error}", file=sys.stderr)
        return 1
    finally:
        if generator is not None:
            generator.close()
        if system is not None:
            await system.stop()
            if not succeeded or keep:
                print(f"   the storm's services' logs are in {system.log_path}")
            else:
                system.remove_state_dir()
