"""Webhooks delivered to real receivers on loopback, each delivery verified with the standardwebhooks
package as a host app would: signed, retried with the same webhook-id, given up after a bounded time
without holding up other endpoints, and kept in Redis across a dispatcher killed with -9.

Run as `python -m tests.integration.test_webhooks REDIS_URL NAMESPACE URL SECRET`, this file is the
process the restart test kills: it records a show's events in the Redis outbox, says so, and waits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook, WebhookVerificationError

from services.common.capacity import CapacityLimits
from services.common.lifecycle import cancel_and_wait
from services.stagemanager.autoscaler import RoomLoad
from services.stagemanager.inventory import Inventory
from services.stagemanager.model import RoomRecord, StageRecord, StageState
from services.webhooks.redis_outbox import open_redis_outbox
from services.webhooks.service import read_webhook_settings, start_webhooks
from services.webhooks.settings import WebhookSettings
from tests.integration.system import running_system
from tests.integration.waiting import eventually
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Receiver:
    """A host app's webhook endpoint: verifies each request with standardwebhooks, answers with the
    statuses queued in `answers` (then 204), or holds requests while `hold` is set."""

    secret: str = SECRET
    answers: list[int] = field(default_factory=list)
    hold: bool = False
    # Every request that verified, in order: (headers, body); and those accepted, by webhook-id.
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: int = 0
    holding: int = 0
    url: str = ""
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        try:
            payload = Webhook(self.secret).verify(body, headers)
        except WebhookVerificationError:
            self.rejected += 1
            return web.Response(status=400)
        self.attempts.append((headers, body))
        if self.hold:
            self.holding += 1
            await self._release.wait()
        if self.answers:
            return web.Response(status=self.answers.pop(0))
        self.accepted.setdefault(headers["webhook-id"], payload)
        return web.Response(status=204)

    def types(self) -> list[str]:
        return [payload["type"] for payload in self.accepted.values()]

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/hooks/fanout", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hooks/fanout"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def receiving(**options: Any) -> AsyncIterator[Receiver]:
    receiver = Receiver(**options)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


class NoViewers:
    """Occupancy as the allocator answers it for rooms nobody watches."""

    async def fetch(self) -> dict[str, RoomLoad]:
        return {}


def webhook_env(redis_url: str, namespace: str, *urls: str, **extra: str) -> dict[str, str]:
    return {
        "FANOUT_WEBHOOK_URLS": ",".join(urls),
        "FANOUT_WEBHOOK_SECRET": SECRET,
        "FANOUT_WEBHOOK_STORE": "redis",
        "FANOUT_REDIS_URL": redis_url,
        "FANOUT_CLUSTER_ID": namespace,
        **extra,
    }


@contextlib.asynccontextmanager
async def running_webhooks(
    environ: Mapping[str, str],
    inventory: Inventory,
    registry: CollectorRegistry,
    occupancy: Any = None,
    limits: CapacityLimits | None = None,
    **changes: Any,
) -> AsyncIterator[WebhookSettings]:
    """start_webhooks as the stage manager calls it; `changes` shorten the retry schedule."""
    settings = dataclasses.replace(read_webhook_settings(environ), **changes)
    tasks = start_webhooks(
        settings, inventory, occupancy or NoViewers(), limits or CapacityLimits(), registry
    )
    try:
        yield settings
    finally:
        await cancel_and_wait(tasks)


@pytest.fixture
async def namespace(redis_url: str) -> AsyncIterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    async with redis.Redis.from_url(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"fanout:{name}:*")]
        if keys:
            await client.delete(*keys)


def arn(index: int, room: str = "main") -> str:
    return f"arn:aws:ivs:us-east-1:123456789012:stage/{room}-w{index}"


def start_show(inventory: Inventory, stages: int = 1, room: str = "main") -> None:
    """A room with `stages` Stages in IVS, its broadcaster publishing on the first: as the room
    manager tells the inventory. Events: stage.added per Stage, then room.live."""
    inventory.add_room(RoomRecord(room=room, created_at=time.time()))
    records = [
        StageRecord(room=room, index=i, state=StageState.STANDBY, created_at=time.time(), arn=arn(i, room))
        for i in range(stages)
    ]
    for record in records:
        inventory.add_stage(record)
    inventory.update_stage(records[0], state=StageState.LIVE, publishing=True)
    inventory.room_publishing_changed(room)


def deliveries(registry: CollectorRegistry, host: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "fanout_webhook_deliveries_total", {"endpoint_host": host, "outcome": outcome}
    )
    return value or 0.0


def host_of(url: str) -> str:
    return url.split("/")[2]


async def test_deliveries_are_signed_and_verify_with_the_standardwebhooks_package(
    redis_url: str, namespace: str
) -> None:
    registry, inventory = CollectorRegistry(), Inventory()
    async with (
        receiving() as receiver,
        receiving(secret="whsec_" + base64.b64encode(b"x" * 32).decode()) as other,
    ):
        environ = webhook_env(redis_url, namespace, receiver.url, other.url)
        async with running_webhooks(environ, inventory, registry):
            before = time.time()
            start_show(inventory)
            await eventually(lambda: len(receiver.accepted) == 2, what="two events delivered")
            # A receiver holding another secret rejects every delivery: the signature means something.
            await eventually(lambda: other.rejected >= 2, what="the other secret's receiver to reject")
            await eventually(
                lambda: (
                    registry.get_sample_value(
                        "fanout_webhook_pending", {"endpoint_host": host_of(receiver.url)}
                    )
                    == 0
                ),
                what="nothing pending for the receiver",
            )
    assert receiver.rejected == 0 and other.accepted == {}
    assert receiver.types() == ["stage.added", "room.live"]
    [(headers, body), _] = receiver.attempts
    assert headers["webhook-id"].startswith("msg_")
    assert before - 1 <= int(headers["webhook-timestamp"]) <= time.time()
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["type"] == "stage.added"
    assert payload["data"] == {"room": "main", "stageArn": arn(0), "role": "origin"}
    assert payload["timestamp"].endswith("Z")
    tampered = body.replace(b'"main"', b'"evil"')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    assert deliveries(registry, host_of(receiver.url), "delivered") == 2
    assert registry.get_sample_value("fanout_webhook_events_total", {"type": "stage.added"}) == 1


async def test_a_failing_receiver_gets_the_event_at_last_under_the_same_webhook_id(
    redis_url: str, namespace: str
) -> None:
    registry, inventory = CollectorRegistry(), Inventory()
    async with receiving(answers=[500, 500, 503]) as receiver:
        environ = webhook_env(redis_url, namespace, receiver.url)
        async with running_webhooks(environ, inventory, registry, retry_base_seconds=0.05):
            inventory.add_room(RoomRecord(room="main", created_at=time.time()))
            inventory.add_stage(
                StageRecord(room="main", index=0, state=StageState.STANDBY, created_at=0, arn=arn(0))
            )
            await eventually(lambda: len(receiver.accepted) == 1, what="the event accepted")
    ids = [headers["webhook-id"] for headers, _ in receiver.attempts]
    assert len(ids) == 4 and len(set(ids)) == 1
    assert list(receiver.accepted) == ids[:1]
    # Every attempt carries the same body, signed afresh.
    assert len({body for _, body in receiver.attempts}) == 1
    host = host_of(receiver.url)
    assert (deliveries(registry, host, "retried"), deliveries(registry, host, "delivered")) == (3, 1)
    assert deliveries(registry, host, "failed") == 0


async def test_an_endpoint_down_past_the_give_up_time_fails_alone(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    registry, inventory = CollectorRegistry(), Inventory()
    down = f"http://hook-user:hook-password@127.0.0.1:{free_port()}/hooks?token=tok-123"
    async with receiving() as healthy, receiving(hold=True) as hanging:
        environ = webhook_env(
            redis_url,
            namespace,
            down,
            hanging.url,
            healthy.url,
            FANOUT_WEBHOOK_GIVE_UP_SECONDS="2",
            FANOUT_WEBHOOK_TIMEOUT_SECONDS="1",
        )
        async with running_webhooks(environ, inventory, registry, retry_base_seconds=0.05):
            start_show(inventory)
            # Delivered while the hanging endpoint still holds its first request.
            await eventually(lambda: len(healthy.accepted) == 2, what="the healthy endpoint's events")
            assert hanging.holding >= 1 and hanging.accepted == {}
            for url in (down, hanging.url):
                await eventually(
                    lambda url=url: deliveries(registry, host_of(url).split("@")[-1], "failed") == 2,
                    what=f"{url}'s deliveries given up",
                    within=15,
                )
    assert deliveries(registry, host_of(healthy.url), "failed") == 0
    assert deliveries(registry, host_of(healthy.url), "retried") == 0
    down_host = host_of(down).split("@")[-1]
    assert registry.get_sample_value("fanout_webhook_pending", {"endpoint_host": down_host}) == 0
    assert deliveries(registry, down_host, "retried") >= 2
    # Logs and labels name the host only: never the URL's credentials or token.
    assert "given up" in caplog.text
    for secret in ("hook-password", "tok-123", "hook-user", SECRET):
        assert secret not in caplog.text
    exposition = [s.labels for m in registry.collect() for s in m.samples]
    assert all("hook-password" not in str(labels) for labels in exposition)


async def test_stopping_the_webhooks_ends_them_even_in_the_middle_of_a_redis_call(
    redis_url: str, namespace: str
) -> None:
    """redis-py can answer as if a cancellation never came: stopping must end every task, every time."""
    down = f"http://127.0.0.1:{free_port()}/hooks"
    settings = dataclasses.replace(
        read_webhook_settings(webhook_env(redis_url, namespace, down)), retry_base_seconds=0.001
    )
    for attempt in range(20):
        registry, inventory = CollectorRegistry(), Inventory()
        tasks = start_webhooks(settings, inventory, NoViewers(), CapacityLimits(), registry)
        start_show(inventory, stages=3, room=f"room-{attempt}")
        # Retrying the dead endpoint keeps the dispatcher talking to Redis all the time.
        await eventually(
            lambda registry=registry: deliveries(registry, host_of(down), "retried") >= 3, what="retries"
        )
        await asyncio.wait_for(cancel_and_wait(tasks), timeout=5)


async def test_events_pending_in_redis_are_delivered_after_the_dispatcher_is_killed(
    redis_url: str, namespace: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/fanout"  # nothing listens yet: deliveries keep failing
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.test_webhooks",
        redis_url,
        namespace,
        url,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        assert line.strip() == b"recorded 4"
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    settings = read_webhook_settings(webhook_env(redis_url, namespace, url))
    outbox = open_redis_outbox(redis_url, namespace, [settings.endpoints[0].key])
    try:
        assert (await outbox.backlog(settings.endpoints[0].key)).pending == 4
    finally:
        await outbox.close()

    receiver = Receiver()
    await receiver.start(port)
    registry = CollectorRegistry()
    try:
        # A new stage manager on the same Redis: its own inventory has nothing to say yet.
        async with running_webhooks(webhook_env(redis_url, namespace, url), Inventory(), registry):
            await eventually(lambda: len(receiver.accepted) == 4, what="the pending events", within=20)
            await eventually(
                lambda: (
                    registry.get_sample_value("fanout_webhook_pending", {"endpoint_host": host_of(url)}) == 0
                ),
                what="the outbox emptied",
            )
    finally:
        await receiver.stop()
    assert sorted(receiver.types()) == ["room.live", "stage.added", "stage.added", "stage.added"]
    assert receiver.rejected == 0


async def test_a_show_through_the_whole_system(tmp_path: Path, redis_url: str, namespace: str) -> None:
    """The stage manager sends them itself (its leader starts the webhooks from its settings), from its
    real inventory and the real allocator's occupancy, driven through the gateway: one Stage of 5
    viewers is the room's ceiling."""
    async with receiving() as receiver:
        environ = webhook_env(
            redis_url,
            namespace,
            receiver.url,
            FANOUT_WEBHOOK_CAPACITY_CHECK_SECONDS="0.1",
            FANOUT_WEBHOOK_VIEWERS_SUMMARY_SECONDS="1",
        )
        async with (
            running_system(
                tmp_path,
                FANOUT_DIRECT_STAGES="1",
                FANOUT_REPLICAS_PER_ORIGIN="0",
                FANOUT_STAGE_CAPACITY="5",
                FANOUT_STAGE_HARD_LIMIT="5",
                **environ,
            ) as system,
            ClientSession() as http,
        ):
            headers = system.publisher_headers()
            async with http.post(
                f"{system.gateway_url}/api/token/publisher-all", json={}, headers=headers
            ) as r:
                stage_arn = (await r.json())["tokens"][0]["stageArn"]
            await eventually(lambda: receiver.types() == ["stage.added"], what="stage.added")
            async with http.post(
                f"{system.gateway_url}/api/rooms/main/publisher/status",
                json={"stageArn": stage_arn, "publishing": True},
                headers=headers,
            ) as r:
                assert r.status == 204
            await eventually(lambda: "room.live" in receiver.types(), what="room.live")
            for viewer in range(5):
                async with http.post(
                    f"{system.gateway_url}/api/token/viewer", json={"userId": f"v{viewer}"}
                ) as r:
                    assert r.status == 200
                if viewer == 3:
                    await eventually(lambda: "capacity.warning" in receiver.types(), what="capacity.warning")
                    assert "capacity.exhausted" not in receiver.types()
            await eventually(lambda: "capacity.exhausted" in receiver.types(), what="capacity.exhausted")
            await eventually(lambda: "room.viewers" in receiver.types(), what="a viewers summary")
            async with http.delete(f"{system.gateway_url}/api/rooms/main", headers=headers) as r:
                assert r.status == 204
            await eventually(lambda: "room.ended" in receiver.types(), what="room.ended", within=15)
    payloads = list(receiver.accepted.values())
    by_type = {payload["type"]: payload["data"] for payload in payloads}
    assert by_type["stage.added"] == {"room": "main", "stageArn": stage_arn, "role": "origin"}
    assert by_type["stage.removed"] == by_type["stage.added"]
    assert by_type["capacity.warning"] == {
        "room": "main",
        "viewers": 4,
        "ceiling": 5,
        "bindingLimit": "topology",
    }
    assert by_type["capacity.exhausted"] == {**by_type["capacity.warning"], "viewers": 5}
    assert by_type["room.viewers"]["room"] == "main" and by_type["room.viewers"]["ceiling"] == 5
    lifecycle = [
        p["type"]
        for p in payloads
        if p["type"] in ("stage.added", "room.live", "stage.removed", "room.ended")
    ]
    assert lifecycle == ["stage.added", "room.live", "stage.removed", "room.ended"]
    assert [p["type"] for p in payloads].count("capacity.warning") == 1
    assert receiver.rejected == 0


async def _record_a_show_then_wait(redis_url: str, namespace: str, url: str) -> None:
    registry = CollectorRegistry()
    inventory = Inventory()
    environ = webhook_env(redis_url, namespace, url, FANOUT_WEBHOOK_TIMEOUT_SECONDS="1")
    async with running_webhooks(environ, inventory, registry):
        start_show(inventory, stages=3)

        def recorded() -> float:
            return sum(
                registry.get_sample_value("fanout_webhook_events_total", {"type": kind}) or 0
                for kind in ("stage.added", "room.live")
            )

        await eventually(lambda: recorded() == 4, what="the events recorded")
        sys.stdout.write(f"recorded {recorded():.0f}\n")  # read by the parent test
        sys.stdout.flush()
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_record_a_show_then_wait(*sys.argv[1:4]))
