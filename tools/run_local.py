"""`make run`: the IVS emulator, stage manager, allocator, monitor and gateway here, stopped together."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.auth import LOCAL_KEY_FILE, load_or_create_local_publisher_key
from services.common.env import ConfigError, Env

STOP_GRACE_SECONDS = 8.0
# Every process of the local system, in start order: (name, module run with python -m).
SERVICES: tuple[tuple[str, str], ...] = (
    ("ivslocal", "services.ivslocal"),
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
    )


def child_environment(base: dict[str, str], ports: Ports) -> dict[str, str]:
    """One consistent set of addresses for every process; anything the user exported wins elsewhere."""
    env = dict(base)
    env.setdefault("FANOUT_MODE", "local")
    env.update(
        {
            "FANOUT_GATEWAY_PORT": str(ports.gateway),
            "FANOUT_IVSLOCAL_PORT": str(ports.ivslocal),
            "FANOUT_IVS_ENDPOINT": f"http://127.0.0.1:{ports.ivslocal}",
            "FANOUT_STAGEMANAGER_LISTEN": f"127.0.0.1:{ports.stagemanager}",
            "FANOUT_STAGEMANAGER_ADDR": f"127.0.0.1:{ports.stagemanager}",
            "FANOUT_ALLOCATOR_LISTEN": f"127.0.0.1:{ports.allocator}",
            "FANOUT_ALLOCATOR_ADDR": f"127.0.0.1:{ports.allocator}",
            "FANOUT_STAGEMANAGER_METRICS_PORT": str(ports.stagemanager_metrics),
            "FANOUT_ALLOCATOR_METRICS_PORT": str(ports.allocator_metrics),
            "FANOUT_MONITOR_LISTEN": f"127.0.0.1:{ports.monitor}",
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

    async def start(self, name: str, module: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", module, env=self._env)
        self._processes.append((name, process))
        return process

    async def wait_until(self, what: str, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not await asyncio.to_thread(http_ok, url):
            for name, process in self._processes:
                if process.returncode is not None:
                    raise RuntimeError(f"{name} exited with code {process.returncode} while starting")
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


async def run() -> int:
    env = Env(os.environ)
    try:
        ports = read_ports(env)
        state_dir = Path(env.str("FANOUT_STATE_DIR", ".fanout"))
    except ConfigError as error:
        print(f"run: configuration error: {error}", file=sys.stderr)
        return 2
    children = child_environment(dict(os.environ), ports)
    key_note = "from FANOUT_PUBLISHER_KEYS"
    key = ""
    if not env.raw("FANOUT_PUBLISHER_KEYS"):
        key, created = load_or_create_local_publisher_key(state_dir)
        key_note = f"{'new, ' if created else ''}kept in {state_dir / LOCAL_KEY_FILE}"

    supervisor = Supervisor(children)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    base = f"http://127.0.0.1:{ports.gateway}"
    try:
        for name, module in SERVICES:
            await supervisor.start(name, module)
            if name == "ivslocal":
                # The others call it at start; the gRPC services retry each other on their own.
                await supervisor.wait_until(
                    "the IVS emulator", f"http://127.0.0.1:{ports.ivslocal}/_emulator/stats"
                )
        await supervisor.wait_until("the gateway and its dependencies", f"{base}/readyz")
    except RuntimeError as error:
        print(f"run: {error}", file=sys.stderr)
        await supervisor.stop()
        return 1

    print(
        "\n".join(
            [
                "",
                "ivs-fanout is running in local mode (IVS emulator, no AWS account needed)",
                f"  broadcast page   {base}/broadcast",
                f"  watch page       {base}/watch",
                f"  room info        {base}/api/rooms/main",
                f"  metrics          {base}/metrics",
                f"  monitor metrics  http://127.0.0.1:{ports.monitor_metrics}/metrics",
                f"  publisher key    {key or '(yours)'}   ({key_note})",
                "Press Ctrl-C to stop.",
                "",
            ]
        ),
        flush=True,
    )
    exited = asyncio.create_task(supervisor.wait_for_exit())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if exited.done():
        print(f"run: {exited.result()} exited unexpectedly; stopping everything", file=sys.stderr)
        code = 1
    exited.cancel()
    stopping.cancel()
    print("stopping...", flush=True)
    await supervisor.stop()
    print("stopped.", flush=True)
    return code


def main() -> None:
    raise SystemExit(asyncio.run(run()))


if __name__ == "__main__":
    main()
