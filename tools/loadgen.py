"""The load generator: POSTs viewer-token requests in closed or open loop from a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvloop

from tools.bench_cpu import cpu_seconds_of_this_process
from tools.lean_http import Done, LeanPostPool

REQUEST_TIMEOUT_SECONDS = 10.0
OPEN_LOOP_MAX_CONNECTIONS = 256
SCHEDULER_TICK_SECONDS = 0.001


@dataclass(frozen=True)
class ClosedLoopJob:
    url: str
    concurrency: int
    warmup: float
    seconds: float
    id_prefix: str


@dataclass(frozen=True)
class OpenLoopJob:
    url: str
    rate: float
    warmup: float
    seconds: float
    id_prefix: str


@dataclass
class LoadResult:
    """What one job measured; latencies (ms) and counts cover the measured window only."""

    window_seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    # The whole job (warm-up included), to relate the processes' CPU to the work done.
    job_seconds: float = 0.0
    job_requests: int = 0
    generator_cpu_seconds: float = 0.0
    # Open loop only.
    sent: int = 0
    send_lag_ms: list[float] = field(default_factory=list)
    max_in_flight: int = 0


def viewer_body(user_id: str) -> bytes:
    """The viewer-token request's JSON body."""
    return b'{"userId":"' + user_id.encode("ascii") + b'"}'


async def _closed_loop(job: ClosedLoopJob) -> LoadResult:
    job_started, cpu_started = time.perf_counter(), cpu_seconds_of_this_process()
    result = LoadResult(window_seconds=job.seconds)
    # A connection per user, as each has one request at a time.
    pool = LeanPostPool(job.url, job.concurrency)
    loop = asyncio.get_running_loop()
    window_start = time.perf_counter() + job.warmup
    window_end = window_start + job.seconds
    sequence = itertools.count()

    async def post(user_id: str) -> str | None:
        answer: asyncio.Future[str | None] = loop.create_future()
        # An answer after the timeout finds the future cancelled and is dropped.
        pool.post(viewer_body(user_id), lambda error: None if answer.done() else answer.set_result(error))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                return await answer
        except TimeoutError:
            return "TimeoutError"

    async def user() -> None:
        while (started := time.perf_counter()) < window_end:
            error = await post(f"{job.id_prefix}-{next(sequence)}")
            done = time.perf_counter()
            result.job_requests += 1
            if window_start <= done < window_end:
                if error is None:
                    result.latencies_ms.append((done - started) * 1000)
                else:
                    result.errors[error] += 1

    try:
        await asyncio.gather(*(user() for _ in range(job.concurrency)))
    finally:
        pool.close()
    result.job_seconds = time.perf_counter() - job_started
    result.generator_cpu_seconds = cpu_seconds_of_this_process() - cpu_started
    return result


class _OpenLoopAnswers:
    """Counts the open loop's answers as they come; what is unanswered at the end timed out."""

    def __init__(self, result: LoadResult, first_measured: int) -> None:
        self._result = result
        self._first_measured = first_measured
        self._unanswered: dict[int, float] = {}  # index -> scheduled send time
        self._finished = False
        self._none_left = asyncio.Event()

    def sent(self, index: int, scheduled: float) -> Done:
        self._unanswered[index] = scheduled
        if index >= self._first_measured:
            self._result.max_in_flight = max(self._result.max_in_flight, len(self._unanswered))

        def done(error: str | None) -> None:
            if self._finished:
                return
            del self._unanswered[index]
            self._count(index, scheduled, error)
            if not self._unanswered:
                self._none_left.set()

        return done

    async def wait(self, seconds: float) -> None:
        """Waits up to `seconds` for every answer; counts the rest as timed out."""
        self._none_left.clear()
        if self._unanswered:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), seconds)
        self._finished = True
        for index, scheduled in self._unanswered.items():
            self._count(index, scheduled, "TimeoutError")
        self._unanswered.clear()

    def _count(self, index: int, scheduled: float, error: str | None) -> None:
        self._result.job_requests += 1
        if index < self._first_measured:
            return
        if error is None:
            self._result.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        else:
            self._result.errors[error] += 1


async def _open_loop(job: OpenLoopJob) -> LoadResult:
    job_started, cpu_started = time.perf_counter(), cpu_seconds_of_this_process()
    result = LoadResult(window_seconds=job.seconds)
    interval = 1.0 / job.rate
    total = int((job.warmup + job.seconds) * job.rate)
    first_measured = int(job.warmup * job.rate)
    answers = _OpenLoopAnswers(result, first_measured)
    pool = LeanPostPool(job.url, OPEN_LOOP_MAX_CONNECTIONS)
    start = time.perf_counter() + 0.01
    index = 0
    while index < total:
        now = time.perf_counter()
        due = start + index * interval
        if due > now:
            # Not below a millisecond: uvloop's timers count whole milliseconds, so a shorter sleep
            # returns at once and the loop would spin. What is late by it is counted from its schedule.
            await asyncio.sleep(max(due - now, SCHEDULER_TICK_SECONDS))
            continue
        # Everything already due goes now: a late scheduler sends a burst, as real clients would.
        while index < total and (scheduled := start + index * interval) <= now:
            if index >= first_measured:
                result.sent += 1
                result.send_lag_ms.append((now - scheduled) * 1000)
            pool.post(viewer_body(f"{job.id_prefix}-{index}"), answers.sent(index, scheduled))
            index += 1
    await answers.wait(REQUEST_TIMEOUT_SECONDS)
    pool.close()
    result.job_seconds = time.perf_counter() - job_started
    result.generator_cpu_seconds = cpu_seconds_of_this_process() - cpu_started
    return result


def _generator_main(connection: multiprocessing.connection.Connection) -> None:
    """The load generator process: runs jobs from the pipe until it reads None."""
    # Ctrl-C reaches the whole process group; the parent decides when this process ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while (job := connection.recv()) is not None:
        # uvloop, as the services run: the generator's CPU per request is a cost of measuring on the
        # same machine, and the default loop spends about a third more of it.
        if isinstance(job, ClosedLoopJob):
            connection.send(uvloop.run(_closed_loop(job)))
        else:
            connection.send(uvloop.run(_open_loop(job)))


class LoadGenerator:
    """The load generator's process, so it never shares a GIL with the code it measures.

    Spawned rather than forked: this process runs an event loop.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_generator_main, args=(child_end,), daemon=True)
        self._process.start()
        child_end.close()

    async def run(self, job: ClosedLoopJob | OpenLoopJob) -> LoadResult:
        self._connection.send(job)
        result = await asyncio.get_running_loop().run_in_executor(None, self._connection.recv)
        if not isinstance(result, LoadResult):
            raise RuntimeError("the load generator answered with something unexpected")
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._connection.send(None)
        self._process.join(2.0)
        if self._process.is_alive():
            # Mid-job (Ctrl-C): nothing in it is worth waiting for. This also ends a pending recv().
            self._process.terminate()
            self._process.join(2.0)
        self._connection.close()


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values; NaN when there are none."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), round(fraction * len(values) + 0.5)))
    return values[rank - 1]


def describe_errors(errors: Counter[str]) -> str:
    total = sum(errors.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{reason} x{count}" for reason, count in errors.most_common(3)) + ")"
