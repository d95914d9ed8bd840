"""The closed loop driven by wrk (a C load generator), when it is installed.

On a 2-core machine the load generator competes with the gateway and the allocator for the same CPUs:
wrk spends 10-14 µs of CPU per request, the Python generator 19-34 µs (measured on one 2-core VM), so
more of the machine goes to the system being measured. wrk keeps N connections each sending its next
request as soon as the previous is answered (a closed loop), and its Lua script gives every request a
new userId, as the Python generator does. The open loop stays with the Python generator: wrk cannot
send on a fixed schedule.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tools.bench_cpu import cpu_seconds_of_ended_children
from tools.loadgen import REQUEST_TIMEOUT_SECONDS, ClosedLoopJob

WRK = "wrk"
# One wrk thread drives every connection through epoll: enough for tens of thousands of requests a
# second, and a second thread would only take CPU from the services.
THREADS = 1
# Past the job's own time, how long wrk may take to report before the bench gives up on it.
REPORT_GRACE_SECONDS = 30.0
# wrk's request(): a new userId per request (the thread's own prefix and counter), body as the gateway
# wants it. done(): the figures as one JSON line after wrk's own report, found by its marker.
SCRIPT = """
local counter = 0
local prefix = os.getenv("FANOUT_BENCH_ID_PREFIX") or "wrk"
local headers = {["Content-Type"] = "application/json"}

request = function()
  counter = counter + 1
  return wrk.format("POST", nil, headers, '{"userId":"' .. prefix .. "-" .. counter .. '"}')
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'FANOUT_WRK {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""
MARKER = "FANOUT_WRK "


class WrkError(RuntimeError):
    """wrk failed, or printed no figures."""


@dataclass(frozen=True)
class WrkFigures:
    """One wrk run: requests completed (any status), its duration, latency percentiles, errors."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: Counter[str]

    @property
    def answered(self) -> int:
        """Requests answered with a 2xx or 3xx: wrk counts 4xx and 5xx answers as status errors."""
        return self.requests - self.errors["non-2xx"]


def available() -> bool:
    return shutil.which(WRK) is not None


def _executable() -> str:
    found = shutil.which(WRK)
    if found is None:
        raise WrkError(f"{WRK} is not installed (make system-deps installs it)")
    return found


def parse_report(output: str) -> WrkFigures:
    """The figures from the line the script's done() printed."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            figures = json.loads(line[len(MARKER) :])
            break
    else:
        raise WrkError(f"wrk printed no figures: {output.strip()[-500:]!r}")
    errors: Counter[str] = Counter()
    for name in ("connect", "read", "write", "timeout"):
        if figures[name]:
            errors[f"wrk {name}"] = figures[name]
    if figures["status"]:
        errors["non-2xx"] = figures["status"]
    return WrkFigures(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p90_ms=figures["p90_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=errors,
    )


class WrkClosedLoop:
    """Runs closed-loop jobs with wrk: a warm-up run, then the measured run, each a wrk process."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fanout-wrk-")
        self._script = Path(self._dir.name) / "viewers.lua"
        self._script.write_text(SCRIPT)

    async def run(self, job: ClosedLoopJob) -> tuple[WrkFigures, float, int]:
        """(the measured run's figures, wrk's CPU seconds for both runs, requests in both runs)."""
        cpu_started = cpu_seconds_of_ended_children()
        warmup = await self._wrk(job, f"{job.id_prefix}-w", job.warmup)
        measured = await self._wrk(job, job.id_prefix, job.seconds)
        return measured, cpu_seconds_of_ended_children() - cpu_started, warmup.requests + measured.requests

    async def _wrk(self, job: ClosedLoopJob, id_prefix: str, seconds: float) -> WrkFigures:
        # wrk counts whole seconds; its timeout is per request, the Python generator's own.
        duration = max(1, round(seconds))
        process = await asyncio.create_subprocess_exec(
            _executable(),
            f"--threads={THREADS}",
            f"--connections={job.concurrency}",
            f"--duration={duration}s",
            f"--timeout={REQUEST_TIMEOUT_SECONDS:.0f}s",
            f"--script={self._script}",
            job.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"FANOUT_BENCH_ID_PREFIX": id_prefix},
        )
        try:
            async with asyncio.timeout(duration + REPORT_GRACE_SECONDS):
                output, _ = await process.communicate()
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
        text = output.decode(errors="replace")
        if process.returncode != 0:
            raise WrkError(f"wrk exited with {process.returncode}: {text.strip()[-500:]!r}")
        return parse_report(text)

    def close(self) -> None:
        self._dir.cleanup()
