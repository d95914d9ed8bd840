"""The local system's processes: their start order, ports and environment, and the Supervisor of them."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

from services.common.env import Env

HOST = "127.0.0.1"
STOP_GRACE_SECONDS = 8.0
# Every process of the local system, in start order: (name, module run with python -m).
SERVICES: tuple[tuple[str, str], ...] = (
    ("ivslocal", "services.ivslocal"),
    # moto's server: the `ivs` channel API (CreateChannel, GetChannel, ...) for the overflow tier.
    ("channels", "moto.server"),
    ("stagemanager", "services.stagemanager"),
    ("allocator", "services.allocator"),
    ("monitor", "services.monitor"),
    ("gateway", "gateway"),
)
READY_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Ports:
    gateway: int
    ivslocal: int
    stagemanager: int
    allocator: int
    monitor: int
    stagemanager_metrics: int
    allocator_metrics: int
    monitor_metrics: int
    # moto's `ivs` server (the overflow tier's channels).
    channels: int = 0


def read_ports(env: Env) -> Ports:
    def port(name: str, default: int) -> int:
        return env.int(name, default, minimum=1, maximum=65535)

    return Ports(
        gateway=port("FANOUT_GATEWAY_PORT", 8080),
        ivslocal=port("FANOUT_IVSLOCAL_PORT", 8099),
        stagemanager=port("FANOUT_STAGEMANAGER_PORT", 50061),
        allocator=port("FANOUT_ALLOCATOR_PORT", 50062),
        monitor=port("FANOUT_MONITOR_PORT", 50063),
        stagemanager_metrics=port("FANOUT_STAGEMANAGER_METRICS_PORT", 9461),
        allocator_metrics=port("FANOUT_ALLOCATOR_METRICS_PORT", 9462),
        monitor_metrics=port("FANOUT_MONITOR_METRICS_PORT", 9463),
        channels=env.int("FANOUT_IVS_CHANNEL_PORT", 0, minimum=0, maximum=65535) or free_loopback_port(),
    )


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_environment(base: dict[str, str], ports: Ports) -> dict[str, str]:
    """One consistent set of addresses for every process; anything the user exported wins elsewhere."""
    env = dict(base)
    env.setdefault("FANOUT_MODE", "local")
    # Metrics on loopback too, as every other port here; Kubernetes keeps the all-interfaces default.
    env.setdefault("FANOUT_METRICS_HOST", HOST)
    env.update(
        {
            "FANOUT_GATEWAY_PORT": str(ports.gateway),
            "FANOUT_IVSLOCAL_PORT": str(ports.ivslocal),
            "FANOUT_IVS_ENDPOINT": f"http://{HOST}:{ports.ivslocal}",
            "FANOUT_IVS_CHANNEL_ENDPOINT": f"http://{HOST}:{ports.channels}",
            "FANOUT_STAGEMANAGER_LISTEN": f"{HOST}:{ports.stagemanager}",
            "FANOUT_STAGEMANAGER_ADDR": f"{HOST}:{ports.stagemanager}",
            "FANOUT_ALLOCATOR_LISTEN": f"{HOST}:{ports.allocator}",
            "FANOUT_ALLOCATOR_ADDR": f"{HOST}:{ports.allocator}",
            "FANOUT_STAGEMANAGER_METRICS_PORT": str(ports.stagemanager_metrics),
            "FANOUT_ALLOCATOR_METRICS_PORT": str(ports.allocator_metrics),
            "FANOUT_MONITOR_LISTEN": f"{HOST}:{ports.monitor}",
            "FANOUT_MONITOR_METRICS_PORT": str(ports.monitor_metrics),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - a loopback URL we built
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Supervisor:
    """Starts the processes in dependency order and stops them in reverse, on a signal or a crash."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._processes: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start_all(self, ports: Ports, output: IO[str] | None = None) -> None:
        """Starts every service of SERVICES; returns once the gateway and its dependencies are ready.

        The services write to `output`, or to this process's stdout and stderr when it is None.
        """
        for name, module in SERVICES:
            arguments = ["-H", HOST, "-p", str(ports.channels)] if name == "channels" else []
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *arguments, env=self._env, stdout=output, stderr=output
            )
            self._processes.append((name, process))
            if name == "ivslocal":
                # The others call it at start; the gRPC services retry each other on their own.
                await self._wait_until("the IVS emulator", f"http://{HOST}:{ports.ivslocal}/_emulator/stats")
            elif name == "channels":
                await self._wait_until("the channel API (moto)", f"http://{HOST}:{ports.channels}/moto-api/")
        await self._wait_until("the gateway and its dependencies", f"http://{HOST}:{ports.gateway}/readyz")

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes}

    def raise_if_exited(self, when: str) -> None:
        """RuntimeError naming the first process that has exited; `when` ends the message."""
        for name, process in self._processes:
            if process.returncode is not None:
                raise RuntimeError(f"{name} exited with code {process.returncode} {when}")

    async def _wait_until(self, what: str, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not await asyncio.to_thread(http_ok, url):
            self.raise_if_exited("while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready after {READY_TIMEOUT_SECONDS:.0f} s")
            await asyncio.sleep(0.2)

    async def wait_for_exit(self) -> str:
        waits = {asyncio.create_task(p.wait()): name for name, p in self._processes}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        for _, process in reversed(self._processes):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for name, process in reversed(self._processes):
            try:
                await asyncio.wait_for(process.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                print(f"  {name} did not stop in time; killing it", flush=True)
                process.kill()
                await process.wait()
