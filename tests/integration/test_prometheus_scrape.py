"""A real Prometheus (Debian's package) scrapes the running system: its numbers match the room's truth."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from tests.integration.audience import place_viewers
from tests.integration.system import System, running_system
from tests.ports import free_port
from tests.prometheus_binaries import require_binary

VIEWERS = 7
MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "monitoring"


@contextlib.contextmanager
def serving_registry(registry: CollectorRegistry) -> Iterator[str]:
    """The registry on a free loopback port, as the service's own metrics port would serve it."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def prometheus_config(targets: dict[str, str]) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.rules.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }


@contextlib.asynccontextmanager
async def running_prometheus(tmp_path: Path, targets: dict[str, str]) -> AsyncIterator[str]:
    binary = require_binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(targets)))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"prometheus not ready after 10 s:\n{log_path.read_text()}")
        yield url
    finally:
        process.terminate()
        try:
            code = await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            raise AssertionError("prometheus did not stop within 10 s of SIGTERM") from None
        assert code == 0, f"prometheus exited with {code}:\n{log_path.read_text()}"


async def query(http: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    async with http.get(f"{url}/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert body["status"] == "success", f"{promql}: {body}"
    return list(body["data"]["result"])


async def until(what: str, check: Callable[[], Awaitable[tuple[Any, ...]]], within: float = 15.0) -> Any:
    """Polls the async `check` until it returns something truthy; fails with its last value."""
    deadline = asyncio.get_running_loop().time() + within
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()
        if last and last[0]:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    # What Grafana substitutes: the selected room and its rate window.
    return [expr.replace("$__rate_interval", "1m").replace("$room", "main") for expr in exprs]


async def test_prometheus_scrapes_the_system_and_agrees_with_room_info(tmp_path: Path) -> None:
    async with asyncio.timeout(30), running_system(tmp_path / "state") as system:
        await scrape_and_compare(system, tmp_path)


async def scrape_and_compare(system: System, tmp_path: Path) -> None:
    # The gateway serves /metrics itself; every other service's registry goes on a loopback port of its own.
    with contextlib.ExitStack() as serving:
        targets = {"gateway": system.gateway_url.removeprefix("http://")}
        for service, registry in system.registries.items():
            if service != "gateway":
                targets[service] = serving.enter_context(serving_registry(registry))
        async with running_prometheus(tmp_path, targets) as prometheus, aiohttp.ClientSession() as http:
            await place_viewers(system, VIEWERS)

            async def every_target_up() -> tuple[bool, list[dict[str, Any]]]:
                result = await query(http, prometheus, "up")
                ups = {sample["metric"]["job"]: sample["value"][1] for sample in result}
                return ups == dict.fromkeys(targets, "1"), result

            await until("every scrape target up", every_target_up)

            async def room_viewers() -> tuple[bool, list[dict[str, Any]]]:
                result = await query(http, prometheus, 'sum(fanout_room_viewers{room="main"})')
                return bool(result) and float(result[0]["value"][1]) == VIEWERS, result

            await until(f"sum(fanout_room_viewers) == {VIEWERS}", room_viewers)

            async def stages_match_room_info() -> tuple[bool, dict[str, int], dict[str, int]]:
                async with http.get(f"{system.gateway_url}/api/rooms/main") as response:
                    room = await response.json()
                truth: dict[str, int] = {}
                for stage in room["stages"]:
                    truth[stage["state"]] = truth.get(stage["state"], 0) + 1
                result = await query(http, prometheus, 'sum by (state) (fanout_stages{room="main"})')
                scraped = {s["metric"]["state"]: int(float(s["value"][1])) for s in result}
                nonzero = {state: count for state, count in scraped.items() if count}
                return bool(truth) and nonzero == truth and "LIVE" in truth, nonzero, truth

            await until("fanout_stages by state to match GET /api/rooms/main", stages_match_room_info)

            # Every dashboard query is valid PromQL against the real server.
            for expr in dashboard_queries():
                await query(http, prometheus, expr)

            async def rules_healthy() -> tuple[bool, list[tuple[str, str]]]:
                async with http.get(f"{prometheus}/api/v1/rules") as response:
                    groups = (await response.json())["data"]["groups"]
                health = [(rule["name"], rule["health"]) for group in groups for rule in group["rules"]]
                return bool(health) and all(state == "ok" for _, state in health), health

            # The alert rules load and evaluate in a real Prometheus, and none fires on a healthy system.
            await until("every alert rule evaluated", rules_healthy)
            async with http.get(f"{prometheus}/api/v1/alerts") as response:
                alerts = (await response.json())["data"]["alerts"]
            assert [alert for alert in alerts if alert["state"] == "firing"] == []
