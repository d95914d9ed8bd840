"""The local system started for a bench: free loopback ports, a temporary state dir, logs in a file."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from tools.local_system import HOST, Ports, Supervisor, child_environment

ROOM = "main"
# What ends a bench with a message instead of a traceback.
BENCH_FAILURES = (RuntimeError, OSError, EOFError, KeyError, ValueError, aiohttp.ClientError)


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


def bench_environment(
    state_dir: Path, ports: Ports, publisher_key: str, settings: Mapping[str, str]
) -> dict[str, str]:
    """The services' environment: local mode, nothing from a real deployment, then `settings`."""
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
            # Leases outlive the run, so lease expiry (a separate cost) stays out of the figures.
            "FANOUT_VIEWER_LEASE_SECONDS": "3600",
            "FANOUT_IVSLOCAL_RATE_LIMITS": "false",
            "FANOUT_LOG_JSON": "false",
            "FANOUT_SHUTDOWN_GRACE_SECONDS": "1",
            **settings,
        }
    )
    return env


async def request_json(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One setup request from this process; anything but a 200 with a JSON object is a failure."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(
            method, url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        ) as response,
    ):
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {text[:200]}")
        answer = json.loads(text)
    if not isinstance(answer, dict):
        raise RuntimeError(f"{url} answered with something that is not a JSON object")
    return answer


class BenchSystem:
    """Every service of the local system, with `settings` added to the bench's environment."""

    def __init__(self, prefix: str, settings: Mapping[str, str]) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.log_path = self.state_dir / "services.log"
        self.ports = bench_ports()
        self.publisher_key = secrets.token_urlsafe(24)
        self.base = f"http://{HOST}:{self.ports.gateway}"
        self.viewer_url = f"{self.base}/api/token/viewer"
        self._supervisor = Supervisor(
            bench_environment(self.state_dir, self.ports, self.publisher_key, settings)
        )

    async def start(self) -> None:
        """Starts the services, their output going to `log_path`; returns once the gateway is ready."""
        with self.log_path.open("a") as log:
            await self._supervisor.start_all(self.ports, output=log)

    async def publisher_tokens(self) -> dict[str, Any]:
        """The publisher's tokens for every Stage of the room, as the broadcast page asks for them."""
        return await request_json(
            "POST",
            f"{self.base}/api/token/publisher-all",
            b"{}",
            {"Authorization": f"Bearer {self.publisher_key}"},
        )

    async def room(self) -> dict[str, Any]:
        return await request_json("GET", f"{self.base}/api/rooms/{ROOM}")

    @property
    def pids(self) -> dict[str, int]:
        return self._supervisor.pids

    def raise_if_exited(self) -> None:
        self._supervisor.raise_if_exited("during the run")

    async def stop(self) -> None:
        await self._supervisor.stop()

    def remove_state_dir(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
