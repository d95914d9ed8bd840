"""CPU meters for the bench: per-process CPU seconds, the machine's busy time, and one job's CPU shares."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MACHINE = "machine"
BENCH = "bench"
GENERATOR = "generator"
# The columns the report shows, in its order.
SHOWN = ("gateway", "allocator", GENERATOR)


def cpu_seconds_of_this_process() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds_of_ended_children() -> float:
    """CPU seconds of this process's children that have ended and been waited for (a wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc; 0 when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name, which may itself contain spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants (the gateway's workers)."""
    total = process_cpu_seconds(pid)
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            child_pids = [int(child) for child in children.read_text().split()]
        except (OSError, ValueError):
            continue
        total += sum(process_tree_cpu_seconds(child) for child in child_pids)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle since boot (steal included: it is time we did not get)."""
    try:
        first_line = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return 0.0
    ticks = [int(value) for value in first_line.split()[1:9]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds of the service processes, this process and the whole machine between readings."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._last = self.read()
        self._last_wall = time.perf_counter()

    def read(self) -> dict[str, float]:
        readings = {name: process_tree_cpu_seconds(pid) for name, pid in self._pids.items()}
        readings[BENCH] = cpu_seconds_of_this_process()
        readings[MACHINE] = machine_busy_seconds()
        return readings

    def lap(self) -> tuple[dict[str, float], float]:
        """(CPU seconds used per name, wall seconds) since the previous lap."""
        now, wall = self.read(), time.perf_counter()
        used = {name: now[name] - self._last[name] for name in now}
        elapsed = wall - self._last_wall
        self._last, self._last_wall = now, wall
        return used, elapsed


@dataclass(frozen=True)
class LevelCpu:
    """CPU seconds each process used during one job, what the job did, and what others took meanwhile."""

    used: dict[str, float]
    seconds: float
    requests: int
    other: float

    @classmethod
    def of(cls, lap: tuple[dict[str, float], float], generator_seconds: float, requests: int) -> LevelCpu:
        """From a CpuMeter lap around the job and the generator's own CPU seconds and requests."""
        readings, seconds = lap
        used = {name: value for name, value in readings.items() if name != MACHINE}
        used[GENERATOR] = generator_seconds
        other = max(0.0, readings[MACHINE] - sum(used.values()))
        return cls(used, max(seconds, 1e-9), max(requests, 1), other)

    def percent(self, name: str) -> float:
        return self.used[name] / self.seconds * 100

    def ours_percent(self) -> float:
        return sum(self.used.values()) / self.seconds * 100

    def other_percent(self) -> float:
        return self.other / self.seconds * 100

    def micros_per_token(self, name: str) -> float:
        return self.used[name] / self.requests * 1e6


def cpu_columns(cpu: LevelCpu) -> str:
    """The closed loop's columns: % of one core per shown process, ours, other | µs per token."""
    percents = " ".join(f"{cpu.percent(name):5.0f}" for name in SHOWN)
    per_token = " ".join(f"{cpu.micros_per_token(name):5.0f}" for name in SHOWN)
    return f"{percents} {cpu.ours_percent():5.0f} {cpu.other_percent():5.0f} | {per_token}"


def cpu_percents(cpu: LevelCpu) -> str:
    """The open loop's short form: % of one core per shown process, ours, other."""
    values = (*(cpu.percent(name) for name in SHOWN), cpu.ours_percent(), cpu.other_percent())
    return " ".join(f"{value:.0f}" for value in values)
