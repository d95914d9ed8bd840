"""`make bench`: viewer tokens through the whole path (HTTP -> gateway -> allocator -> signed ES384 token).

Measures DESIGN.md §11's first target (>= 0.5 x one core's raw ES384 signing rate in the same run;
p99 <= 25 ms at half that rate) against the processes `make run` starts, on free loopback ports, in a
temporary state directory. A benchmark, not a test: it prints figures, and exits non-zero only if the
system fails.

How to read the output:

1. baseline: tokens one core signs with the allocator's own minter and nothing else running: the
   ceiling for one allocator process. Everything between it and step 3 is overhead. Measured again for
   1 s before each closed-loop level (last column of step 3): a shared VM's core drifts by a fifth in
   speed from second to second, so the summary compares with the mean of every sample.
2. system: ports, state dir, and the services' log file (read it when anything failed).
3. closed loop: N virtual users, each sending its next request as soon as the previous is answered
   (driven by wrk when it is installed, a C generator that leaves more CPU to the services; else, or
   with --generator python, by tools/loadgen.py);
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
   requests outstanding at once. Run at the target's rate (half of 0.5 x the raw signing rate), and
   at half the best closed-loop rate when that differs (stricter whenever the best beats the target).
5. summary: the targets, the best rate as a fraction of the raw signing rate (the mean of step 1's
   sample and those before each level, with their range), the
   CPU each process spent per token at the best level (gateway, its workers together; allocator; load
   generator), an estimate of the rate without the generator's CPU, the room at the end, the load
   average at the start and the end (above the CPU count, other work shared the machine), and each
   service's CPU seconds since it started.
   A WARNING line means other processes took CPU during the run: the figures then understate the
   system, so rerun on a quiet machine. On a shared VM, rates vary by 10-20 % from run to run even
   when idle (the raw signing samples show by how much); ratios in one run vary less.
6. join storm: fresh systems under a burst of new viewers, once with the fan-out topology (1 origin x 5
   replicas) and once with browser fan-out, each with a broadcaster that really publishes in the
   emulator; per scenario the refusals, the Stages per 1,000 viewers, the Stages the broadcaster
   publishes to against those it reaches, and the room's binding limit. tools/bench_storm.py explains it.

Options: --seconds (per level), --levels (closed-loop concurrencies), --gateway-workers (gateway
processes on the port; CPU columns count them together), --generator (auto, wrk or python: the
closed loop's load generator), --keep (keep the temp dir), --no-storm (skip step 6), --storm-only
(step 6 alone).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from tools.bench_storm import run_storm
from tools.bench_tokens import run_bench

DEFAULT_LEVEL_SECONDS = 5.0
DEFAULT_LEVELS = (1, 8, 32, 64)


@dataclass(frozen=True)
class Run:
    levels: tuple[int, ...]
    seconds: float
    keep: bool
    storm: bool = True
    tokens: bool = True
    gateway_workers: int = 1
    generator: str = "auto"


async def main_async(run: Run) -> int:
    # SIGTERM would otherwise kill this process alone and orphan the services; Ctrl-C is asyncio.run's.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    code = (
        await run_bench(run.levels, run.seconds, run.keep, run.gateway_workers, run.generator)
        if run.tokens
        else 0
    )
    if code == 0 and run.storm:
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
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes sharing the port (FANOUT_GATEWAY_WORKERS; default 1)",
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="closed-loop load generator: wrk (C, little CPU), python (tools/loadgen.py), or auto: "
        "wrk when installed (default)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir and logs")
    parser.add_argument("--no-storm", action="store_true", help="skip the join-storm scenario")
    parser.add_argument("--storm-only", action="store_true", help="run the join-storm scenario alone")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 60 or not args.levels or min(args.levels) < 1:
        parser.error("--seconds must be in (0, 60] and every level at least 1")
    if not 1 <= args.gateway_workers <= 64:
        parser.error("--gateway-workers must be 1-64")
    if args.no_storm and args.storm_only:
        parser.error("--no-storm and --storm-only exclude each other")
    return Run(
        levels=args.levels,
        seconds=args.seconds,
        keep=args.keep,
        storm=not args.no_storm,
        tokens=not args.storm_only,
        gateway_workers=args.gateway_workers,
        generator=args.generator,
    )


def main() -> None:
    run = parse_args()
    try:
        code = asyncio.run(main_async(run))
    except (KeyboardInterrupt, asyncio.CancelledError):
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
