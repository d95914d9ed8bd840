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
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tools.bench import bench_environment, bench_ports, request_json
from tools.loadgen import LoadGenerator, OpenLoopJob, describe_errors, percentile
from tools.local_system import Supervisor
from tools.sse_client import read_events

VIEWERS = 5_000
STORM_SECONDS = 10.0
SOFT_CAPACITY = 50
SAMPLE_SECONDS = 0.25


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


async def follow_as_broadcaster(base: str, key: str, added: list[float], started: float) -> None:
    """Reads the publisher event stream and reports publishing on every Stage it names."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http,
        http.get(f"{base}/api/rooms/main/publisher/events", headers=headers) as stream,
    ):
        async for event, data in read_events(stream):
            tokens = data["tokens"] if event == "snapshot" else [data] if event == "stage-added" else []
            if event == "stage-added":
                added.append(time.perf_counter() - started)
            for token in tokens:
                async with http.post(
                    f"{base}/api/rooms/main/publisher/status",
                    json={"stageArn": token["stageArn"], "publishing": True},
                    headers=headers,
                ) as response:
                    await response.read()


async def watch_pool(base: str, watch: PoolWatch, started: float, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.get(f"{base}/api/rooms/main") as response:
                if response.status == 200:
                    watch.add(time.perf_counter() - started, await response.json())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


async def run_storm(keep: bool) -> int:
    print(
        f"\n6. join storm: {VIEWERS:,} new viewers in {STORM_SECONDS:.0f} s (open loop), soft capacity "
        f"{SOFT_CAPACITY}, autoscaler on, a broadcaster following the event stream"
    )
    state_dir = Path(tempfile.mkdtemp(prefix="fanout-storm-"))
    log_path = state_dir / "services.log"
    supervisor: Supervisor | None = None
    generator: LoadGenerator | None = None
    tasks: list[asyncio.Task[None]] = []
    succeeded = False
    try:
        ports = bench_ports()
        key = secrets.token_urlsafe(24)
        env = bench_environment(state_dir, ports, key)
        env.update(
            {
                "FANOUT_MIN_STAGES": "1",
                "FANOUT_STAGE_CAPACITY": str(SOFT_CAPACITY),
                "FANOUT_STAGE_HARD_LIMIT": "10000",
            }
        )
        supervisor = Supervisor(env)
        base = f"http://127.0.0.1:{ports.gateway}"
        with log_path.open("a") as log:
            await supervisor.start_all(ports, output=log)
        await request_json(
            "POST", f"{base}/api/token/publisher-all", b"{}", {"Authorization": f"Bearer {key}"}
        )
        generator = LoadGenerator()

        started = time.perf_counter()
        added: list[float] = []
        watch = PoolWatch()
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(follow_as_broadcaster(base, key, added, started)),
            asyncio.create_task(watch_pool(base, watch, started, stop)),
        ]
        await asyncio.sleep(0.5)  # the broadcaster is live on the first Stage before the doors open
        result = await generator.run(
            OpenLoopJob(
                f"{base}/api/token/viewer",
                VIEWERS / STORM_SECONDS,
                0.0,
                STORM_SECONDS,
                f"s-{secrets.token_hex(3)}",
            )
        )
        storm_end = time.perf_counter() - started
        # The pool keeps growing after the last join: watch it catch up for a few seconds.
        await asyncio.sleep(5.0)
        stop.set()
        final = await request_json("GET", f"{base}/api/rooms/main")
        watch.add(time.perf_counter() - started, final)
        latencies = sorted(result.latencies_ms)
        placed, refused = len(latencies), sum(result.errors.values())
        stages = [s for s in final["stages"] if s.get("stageArn")]
        live = sum(1 for s in stages if s["state"] == "LIVE")
        needed = -(-final["viewers"] // SOFT_CAPACITY)
        print(f"   placed {placed:,}, refused {describe_errors(result.errors)} (of {result.sent:,} sent)")
        print(
            f"   token latency from scheduled send: p50 {percentile(latencies, 0.5):.1f} ms, "
            f"p90 {percentile(latencies, 0.9):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
            f"max {latencies[-1] if latencies else float('nan'):.1f} ms"
        )
        during = [t for t in added if t <= storm_end]
        print(
            f"   Stages created: {len(added)} ({len(during)} during the storm, first after "
            f"{added[0] if added else float('nan'):.1f} s); at the end {len(stages)} Stages, {live} LIVE, "
            f"for {final['viewers']:,} viewers ({needed} needed at soft capacity)"
        )
        print(
            f"   peak overflow {watch.peak_overflow:,} viewers beyond soft capacity; busiest Stage "
            f"{watch.peak_stage_viewers:,} viewers (hard limit 10,000)"
        )
        for elapsed, viewers, live_stages in watch.live_counts[:: max(1, len(watch.live_counts) // 8)]:
            print(
                f"     t={elapsed:5.1f} s  viewers {viewers:>5,}  LIVE Stages {live_stages:>3}  "
                f"capacity {live_stages * SOFT_CAPACITY:>5,}"
            )
        succeeded = refused == 0
        return 0 if placed else 1
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, aiohttp.ClientError) as error:
        print(f"\nbench: storm failed: {error}", file=sys.stderr)
        return 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if generator is not None:
            generator.close()
        if supervisor is not None:
            await supervisor.stop()
        if not succeeded or keep:
            print(f"   the storm's services' logs are in {log_path}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
