"""The real system started as `make run` starts it, and headless Chromium to drive its pages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = REPO / "test-output" / "screenshots"
PUBLISHER_KEY = "e2e-publisher-key-0123456789"


@dataclass
class RunningSystem:
    base_url: str
    publisher_key: str
    log_path: Path
    ivslocal_url: str
    # The gRPC services' Prometheus endpoints: stagemanager, allocator, monitor.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def ivs(self) -> Any:
        """A boto3 ivs-realtime client for the system's IVS emulator."""
        return boto3.client(
            "ivs-realtime",
            endpoint_url=self.ivslocal_url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )

    def api(
        self, method: str, path: str, body: object | None = None, key: str | None = None
    ) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)  # noqa: S310
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


@contextmanager
def start_system(state_dir: Path, **settings: str) -> Iterator[RunningSystem]:
    """Starts `python -m tools.run_local` on free loopback ports; `settings` are extra FANOUT_* variables."""
    log_path = state_dir / "system.log"
    gateway_port = free_port()
    ivslocal_port = free_port()
    metrics_ports = {service: free_port() for service in ("stagemanager", "allocator", "monitor")}
    # Local mode unless a module asks for AWS settings itself: an AWS region in the developer's shell
    # would otherwise switch every service to AWS mode (read_mode).
    inherited = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    env = {
        **inherited,
        "FANOUT_STATE_DIR": str(state_dir),
        "FANOUT_PUBLISHER_KEYS": PUBLISHER_KEY,
        "FANOUT_GATEWAY_PORT": str(gateway_port),
        "FANOUT_IVSLOCAL_PORT": str(ivslocal_port),
        "FANOUT_STAGEMANAGER_PORT": str(free_port()),
        "FANOUT_ALLOCATOR_PORT": str(free_port()),
        "FANOUT_MONITOR_PORT": str(free_port()),
        **{f"FANOUT_{service.upper()}_METRICS_PORT": str(port) for service, port in metrics_ports.items()},
        "FANOUT_VIEWER_LEASE_SECONDS": "30",
        # The overflow tier composes every live room into HLS in the emulator (real media, CPU): only
        # the modules about it turn it on.
        "FANOUT_OVERFLOW": "off",
        **settings,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tools.run_local"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    system = RunningSystem(
        f"http://127.0.0.1:{gateway_port}",
        PUBLISHER_KEY,
        log_path,
        f"http://127.0.0.1:{ivslocal_port}",
        metrics_ports,
    )
    try:
        deadline = time.monotonic() + 60
        while not (_listening(gateway_port) and system.api("GET", "/readyz")[0] == 200):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the system did not start; see {log_path}:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield system
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


@pytest.fixture(scope="module")
def running_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    """Module-scoped, so a module that needs other settings can start its own with start_system()."""
    with start_system(tmp_path_factory.mktemp("state"), **BROWSER_FAN_OUT, FANOUT_MIN_STAGES="2") as system:
        yield system


# The page publishes to every Stage itself (no replicas): for the tests of a page on several Stages.
BROWSER_FAN_OUT = {"FANOUT_DIRECT_STAGES": "4", "FANOUT_REPLICAS_PER_ORIGIN": "0"}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: Playwright's sync API runs an event loop that must be gone before async tests."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


@dataclass
class PageProblems:
    """Uncaught page errors and console errors; a non-2xx answer the page expects is not a problem."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> Page:
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", self._console)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        # Chromium itself logs every non-2xx fetch as "Failed to load resource"; pages cannot silence it.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(f"console: {message.text}")


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
