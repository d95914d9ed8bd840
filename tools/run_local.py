"""`make run`: the IVS emulator, stage manager, allocator, monitor and gateway here, stopped together."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from gateway.auth import LOCAL_KEY_FILE, load_or_create_local_publisher_key
from services.common.env import ConfigError, Env
from tools.local_system import HOST, Ports, Supervisor, child_environment, read_ports


def publisher_key(env: Env, state_dir: Path) -> tuple[str, str]:
    """(the local publisher key, or "" when the user set FANOUT_PUBLISHER_KEYS; where it comes from)."""
    if env.raw("FANOUT_PUBLISHER_KEYS"):
        return "", "from FANOUT_PUBLISHER_KEYS"
    key, created = load_or_create_local_publisher_key(state_dir)
    return key, f"{'new, ' if created else ''}kept in {state_dir / LOCAL_KEY_FILE}"


def print_running(ports: Ports, key: str, key_note: str) -> None:
    base = f"http://{HOST}:{ports.gateway}"
    print(
        "\n".join(
            [
                "",
                "ivs-fanout is running in local mode (IVS emulator, no AWS account needed)",
                f"  broadcast page   {base}/broadcast",
                f"  watch page       {base}/watch",
                f"  room info        {base}/api/rooms/main",
                f"  metrics          {base}/metrics",
                f"  monitor metrics  http://{HOST}:{ports.monitor_metrics}/metrics",
                f"  channel API      http://{HOST}:{ports.channels} (moto's `ivs`: the overflow channels)",
                f"  publisher key    {key or '(yours)'}   ({key_note})",
                "Press Ctrl-C to stop.",
                "",
            ]
        ),
        flush=True,
    )


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT and SIGTERM set, so that a signal stops every process, not this one alone."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_stopped(supervisor: Supervisor, stop: asyncio.Event) -> int:
    """Waits for `stop` (0) or for a service to exit on its own (1), then stops them all."""
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


async def run() -> int:
    env = Env(os.environ)
    try:
        ports = read_ports(env)
        state_dir = Path(env.str("FANOUT_STATE_DIR", ".fanout"))
    except ConfigError as error:
        print(f"run: configuration error: {error}", file=sys.stderr)
        return 2
    key, key_note = publisher_key(env, state_dir)
    supervisor = Supervisor(child_environment(dict(os.environ), ports))
    stop = stop_on_signals()
    try:
        await supervisor.start_all(ports)
    except RuntimeError as error:
        print(f"run: {error}", file=sys.stderr)
        await supervisor.stop()
        return 1
    print_running(ports, key, key_note)
    return await until_stopped(supervisor, stop)


def main() -> None:
    raise SystemExit(asyncio.run(run()))


if __name__ == "__main__":
    main()
