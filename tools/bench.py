"""`make bench`: viewer tokens through the whole path (HTTP -> gateway -> allocator -> signed ES384 token).

Measures DESIGN.md §11's first target (>= 2,000 tokens/s on one 2-core machine; p99 <= 25 ms at half
that rate) against the processes `make run` starts, on free loopback ports, in a temporary state
directory. A benchmark, not a test: it prints figures, and exits non-zero only if the system fails.

How to read the output:

1. baseline: tokens one core signs with the allocator's own minter and nothing else running: the
   ceiling for one allocator process. Everything between it and step 3 is overhead.
2. system: ports, state dir, and the services' log file (read it when anything failed).
3. closed loop: N virtual users, each sending its next request as soon as the previous is answered;
   every request is a new userId, so every token is a new placement (the expensive path). tok/s counts
   200s completed in the measured window; p50/p90/p99 are per-request latencies; errors are non-200
   answers and failed connections. CPU columns, in % of ONE core: gateway, allocator, the load
   generator (its own process), "ours" (every process of the bench together) and "other" (everything
   else on the machine). With 2 CPUs the ceiling is 200 %: "ours" near 200 means the machine is
   saturated and only less CPU per token helps; gw or alloc near 100 means that single-threaded
   service is the bottleneck; gen near 100 would mean the figure is the generator's limit. Then CPU
   microseconds per token, which tells where the time goes; the generator's share is a cost of
   measuring on the same machine.
4. open loop: requests sent on a fixed schedule without waiting for answers; latency is measured from
   each request's scheduled send time, so queueing anywhere shows up instead of being hidden
   (coordinated omission). "send lag" is how late the generator itself sent; "in flight" the most
   requests outstanding at once. Run at half the best closed-loop rate, and also at 1,000/s (the
   target's half rate) when that is higher.
5. summary: the targets, the best rate as a fraction of the raw signing rate, an estimate of the rate
   without the generator's CPU, the room at the end, and each service's CPU seconds since it started.
   A WARNING line means other processes took CPU during the run: the figures then understate the
   system, so rerun on a quiet machine. Figures vary by about 10 % from run to run.

Options: --seconds (per level), --levels (closed-loop concurrencies), --keep (keep the temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import cryptography

from services.allocator.tokens import SelfSignedMinter, StageEndpoints
from services.common import jwt_es384
from tools.bench_cpu import CpuMeter, LevelCpu, cpu_columns, cpu_percents
from tools.loadgen import (
    ClosedLoopJob,
    LoadGenerator,
    OpenLoopJob,
    describe_errors,
    percentile,
)
from tools.local_system import HOST, SERVICES, Ports, Supervisor, child_environment

TARGET_TOKENS_PER_SECOND = 2000.0
TARGET_P99_MS = 25.0
SIGNING_SECONDS = 2.0
WARMUP_SECONDS = 1.0
DEFAULT_LEVEL_SECONDS = 5.0
DEFAULT_LEVELS = (1, 8, 32, 64)
ROOM = "main"
STAGES = 4
JSON_HEADERS = {"Content-Type": "application/json"}
# Above this much CPU used by processes outside the bench (% of one core), the figures are suspect.
NOISY_OTHER_PERCENT = 15.0


# ---------------------------------------------------------------------------------------------------
# 1. Baseline.


def realistic_stage() -> StageEndpoints:
    return StageEndpoints(
        arn="arn:aws:ivs:us-east-1:123456789012:stage/AbCdEfGhIjKl",
        events_url="wss://global.events.live-video.net",
        whip_url="https://f99084460c35.global-bm.whip.live-video.net",
    )


async def measure_signing(seconds: float) -> tuple[int, float]:
    """(tokens, elapsed) minting viewer tokens back to back with the allocator's own minter."""
    minter = SelfSignedMinter(
        jwt_es384.generate_private_key(), "arn:aws:ivs:us-east-1:123456789012:public-key/AbCdEfGhIjKl"
    )
    stage = realistic_stage()
    attributes = {"room": ROOM, "role": "viewer"}
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(100):
            await minter.mint(stage, f"viewer-{count}", False, True, attributes, 12 * 3600)
            count += 1
        if (now := time.perf_counter()) >= deadline:
            return count, now - started


@contextlib.contextmanager
def pinned_to_one_cpu() -> Iterator[None]:
    """Runs the block on one CPU, then restores the affinity (which children would inherit)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


# ---------------------------------------------------------------------------------------------------
# 2. The system.


def free_loopback_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def bench_ports() -> Ports:
    """A free loopback port for every listener; metrics ports 0, which turns those listeners off."""
    names = [item.name for item in dataclasses.fields(Ports)]
    listeners = [name for name in names if not name.endswith("_metrics")]
    chosen = dict(zip(listeners, free_loopback_ports(len(listeners)), strict=True))
    return Ports(**{name: chosen.get(name, 0) for name in names})


def bench_environment(state_dir: Path, ports: Ports, publisher_key: str) -> dict[str, str]:
    env = child_environment(dict(os.environ), ports)
    for name in (
        "FANOUT_SIGNING_KEY_FILE",
        "FANOUT_STORE",
        "FANOUT_MONITOR_SQS_QUEUE_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        env.pop(name, None)
    env.update(
        {
            "FANOUT_MODE": "local",
            "FANOUT_STATE_DIR": str(state_dir),
            "FANOUT_PUBLISHER_KEYS": publisher_key,
            "FANOUT_TOKEN_MODE": "self-signed",
            "FANOUT_RATE_LIMIT_PER_SECOND": "0",
            "FANOUT_MIN_STAGES": str(STAGES),
            "FANOUT_STAGE_CAPACITY": "10000",
            "FANOUT_STAGE_HARD_LIMIT": "100000",
            # Leases outlive the run, so lease expiry (a separate cost) stays out of the figures.
            "FANOUT_VIEWER_LEASE_SECONDS": "3600",
            "FANOUT_IVSLOCAL_RATE_LIMITS": "false",
            "FANOUT_LOG_JSON": "false",
            "FANOUT_SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    return env


async def request_json(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One setup request from this process; anything but a 200 with a JSON object is a failure."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, url, data=body, headers={**JSON_HEADERS, **(headers or {})}) as response,
    ):
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {text[:200]}")
        answer = json.loads(text)
    if not isinstance(answer, dict):
        raise RuntimeError(f"{url} answered with something that is not a JSON object")
    return answer


# ---------------------------------------------------------------------------------------------------
# The run.


@dataclass(frozen=True)
class Run:
    levels: tuple[int, ...]
    seconds: float
    keep: bool
    storm: bool = True


def header() -> None:
    print("ivs-fanout bench: viewer tokens through HTTP -> gateway -> allocator -> signed ES384 token")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, cryptography {cryptography.__version__}, "
        f"aiohttp {aiohttp.__version__}"
    )


def print_closed_header() -> None:
    print(
        f"  {'conc':>5} {'tok/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}  "
        f"{'errors':<8}| CPU % of one core (machine: {100 * (os.cpu_count() or 1)}) | CPU µs per token"
    )
    blank = " " * 48
    print(f"  {blank}|    gw alloc   gen  ours other |    gw alloc   gen")


async def run_bench(run: Run) -> int:
    header()

    print(f"\n1. baseline: raw ES384 signing on one core (SelfSignedMinter.mint, {SIGNING_SECONDS:.0f} s)")
    with pinned_to_one_cpu():
        signed, elapsed = await measure_signing(SIGNING_SECONDS)
    sign_rate = signed / elapsed
    print(f"   {sign_rate:,.0f} tokens/s   {elapsed / signed * 1e6:.1f} µs/token")

    state_dir = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    log_path = state_dir / "services.log"
    supervisor: Supervisor | None = None
    generator: LoadGenerator | None = None
    succeeded = False
    started = time.perf_counter()
    try:
        ports = bench_ports()
        publisher_key = secrets.token_urlsafe(24)
        supervisor = Supervisor(bench_environment(state_dir, ports, publisher_key))
        base = f"http://{HOST}:{ports.gateway}"
        print(
            f"\n2. system: gateway {base}, IVS emulator :{ports.ivslocal}, stage manager "
            f":{ports.stagemanager}, allocator :{ports.allocator}, monitor :{ports.monitor}"
        )
        print(f"   state dir {state_dir}, services' logs in {log_path}")
        with log_path.open("a") as log:
            await supervisor.start_all(ports, output=log)
        generator = LoadGenerator()
        room = await request_json(
            "POST", f"{base}/api/token/publisher-all", b"{}", {"Authorization": f"Bearer {publisher_key}"}
        )
        sample = await request_json("POST", f"{base}/api/token/viewer", b'{"userId":"bench-sample"}')
        signing_key = jwt_es384.private_key_from_pem((state_dir / "signing-key.pem").read_bytes())
        claims = jwt_es384.verify(sample["token"], signing_key.public_key())
        if claims.get("user_id") != "bench-sample" or claims["capabilities"]["allow_publish"]:
            raise RuntimeError("the sample viewer token does not carry the claims it should")
        print(
            f"   room {room['room']}: {len(room['tokens'])} Stages; sample viewer token verified "
            f"({len(sample['token'])} chars, ES384)"
        )

        meter = CpuMeter(supervisor.pids)
        url = f"{base}/api/token/viewer"
        print(
            f"\n3. closed loop: a new userId per request, {WARMUP_SECONDS:.0f} s warm-up + "
            f"{run.seconds:.0f} s per level"
        )
        print_closed_header()
        best_rate, best_level, best_cpu = 0.0, 0, None
        busiest_other = 0.0
        for level in run.levels:
            meter.lap()
            result = await generator.run(
                ClosedLoopJob(url, level, WARMUP_SECONDS, run.seconds, f"c{level}-{secrets.token_hex(3)}")
            )
            used = meter.lap()
            supervisor.raise_if_exited("during the run")
            latencies = sorted(result.latencies_ms)
            rate = len(latencies) / result.window_seconds
            cpu = LevelCpu.of(used, result.generator_cpu_seconds, result.job_requests)
            busiest_other = max(busiest_other, cpu.other_percent())
            if rate > best_rate:
                best_rate, best_level, best_cpu = rate, level, cpu
            print(
                f"  {level:>5} {rate:>8,.0f} {percentile(latencies, 0.5):>7.1f} "
                f"{percentile(latencies, 0.9):>7.1f} {percentile(latencies, 0.99):>7.1f}  "
                f"{describe_errors(result.errors):<8}| {cpu_columns(cpu)}"
            )

        half_best = best_rate / 2
        rates = [half_best]
        if half_best < TARGET_TOKENS_PER_SECOND / 2:
            rates.append(TARGET_TOKENS_PER_SECOND / 2)
        print(
            f"\n4. open loop: fixed schedule, latency from the scheduled send time, "
            f"{run.seconds:.0f} s after {WARMUP_SECONDS / 2:.1f} s warm-up"
        )
        print(
            f"  {'target/s':>8} {'sent/s':>8} {'ok/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  "
            f"{'errors':<8} {'in flight':>9} {'send lag p99':>12} | CPU %: gw alloc gen ours other"
        )
        open_p99: dict[float, float] = {}
        for rate in rates:
            if rate < 1:
                continue
            meter.lap()
            result = await generator.run(
                OpenLoopJob(url, rate, WARMUP_SECONDS / 2, run.seconds, f"o{rate:.0f}-{secrets.token_hex(3)}")
            )
            used = meter.lap()
            supervisor.raise_if_exited("during the run")
            latencies = sorted(result.latencies_ms)
            lags = sorted(result.send_lag_ms)
            open_p99[rate] = percentile(latencies, 0.99)
            level_cpu = LevelCpu.of(used, result.generator_cpu_seconds, result.job_requests)
            busiest_other = max(busiest_other, level_cpu.other_percent())
            print(
                f"  {rate:>8,.0f} {result.sent / result.window_seconds:>8,.0f} "
                f"{len(latencies) / result.window_seconds:>8,.0f} {percentile(latencies, 0.5):>7.1f} "
                f"{open_p99[rate]:>7.1f} {latencies[-1] if latencies else float('nan'):>7.1f}  "
                f"{describe_errors(result.errors):<8} {result.max_in_flight:>9} "
                f"{percentile(lags, 0.99):>9.1f} ms | {cpu_percents(level_cpu)}"
            )

        print("\n5. summary")
        verdict = "MET" if best_rate >= TARGET_TOKENS_PER_SECOND else "MISSED"
        print(
            f"   best throughput    {best_rate:,.0f} tokens/s (concurrency {best_level}); target >= "
            f"{TARGET_TOKENS_PER_SECOND:,.0f}/s: {verdict} ({best_rate / TARGET_TOKENS_PER_SECOND:.0%})"
        )
        print(
            f"   vs raw signing     {best_rate:,.0f} / {sign_rate:,.0f} = {best_rate / sign_rate:.2f} "
            f"of one core's signing rate"
        )
        if best_cpu is not None:
            cpus = os.cpu_count() or 1
            services_micros = best_cpu.micros_per_token("gateway") + best_cpu.micros_per_token("allocator")
            generator_micros = best_cpu.micros_per_token("generator")
            print(
                f"   at the best level  the bench's processes used {best_cpu.ours_percent():.0f} % of "
                f"{100 * cpus} %; CPU per token: gateway + allocator {services_micros:.0f} µs "
                f"(signing {1e6 / sign_rate:.0f} µs of it), load generator {generator_micros:.0f} µs"
            )
            print(
                f"   without the generator (an estimate, not a measurement): {cpus} CPUs / "
                f"{services_micros:.0f} µs = {cpus * 1e6 / services_micros:,.0f} tokens/s at most"
            )
        for rate, p99 in open_p99.items():
            verdict = "MET" if p99 <= TARGET_P99_MS else "MISSED"
            label = "half the best" if rate == half_best else "the target's half rate"
            print(
                f"   p99 at {rate:,.0f}/s ({label}): {p99:.1f} ms; "
                f"target <= {TARGET_P99_MS:.0f} ms: {verdict}"
            )
        room_after = await request_json("GET", f"{base}/api/rooms/{ROOM}")
        print(
            f"   room {ROOM} at the end: {room_after.get('viewers')} viewers on "
            f"{len(room_after.get('stages', []))} Stages (the autoscaler may have grown the pool)"
        )
        wall = time.perf_counter() - started
        totals = meter.read()
        print(
            "   CPU seconds since start: "
            + ", ".join(f"{name} {totals[name]:.1f}" for name, _ in SERVICES)
            + f" (wall {wall:.0f} s, {os.cpu_count()} CPUs)"
        )
        if busiest_other >= NOISY_OTHER_PERCENT:
            print(
                f"   WARNING: other processes on this machine used up to {busiest_other:.0f} % of a CPU "
                "during a level (column 'other'); these figures understate the system. Rerun when idle."
            )
        succeeded = True
        return 0
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, aiohttp.ClientError) as error:
        print(f"\nbench: failed: {error}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("\nbench: interrupted", file=sys.stderr)
        raise
    finally:
        if generator is not None:
            generator.close()
        if supervisor is not None:
            print("stopping the system...", flush=True)
            await supervisor.stop()
        if not succeeded:
            print(f"bench: the services' logs are kept in {log_path}", file=sys.stderr)
        elif not run.keep:
            shutil.rmtree(state_dir, ignore_errors=True)


async def main_async(run: Run) -> int:
    # SIGTERM would otherwise kill this process alone and orphan the services; Ctrl-C is asyncio.run's.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    code = await run_bench(run)
    if code == 0 and run.storm:
        from tools.bench_storm import run_storm

        code = await run_storm(run.keep)
    return code


def parse_args(argv: Sequence[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--seconds", type=float, default=DEFAULT_LEVEL_SECONDS, help="measured seconds per level"
    )
    parser.add_argument(
        "--levels",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=DEFAULT_LEVELS,
        help="closed-loop concurrencies, comma-separated (default 1,8,32,64)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir and logs")
    parser.add_argument("--no-storm", action="store_true", help="skip the join-storm scenario")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 60 or not args.levels or min(args.levels) < 1:
        parser.error("--seconds must be in (0, 60] and every level at least 1")
    return Run(levels=args.levels, seconds=args.seconds, keep=args.keep, storm=not args.no_storm)


def main() -> None:
    run = parse_args()
    try:
        code = asyncio.run(main_async(run))
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
