"""The outbox contract, for the memory outbox and the Redis one (a real redis-server): an event goes out
once per change of its room's announced state, each endpoint has its own queue, a claim hides a
delivery until its lease ends, and an event leaves when every endpoint is done with it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as redis

from services.common.errors import Unavailable
from services.webhooks.events import EventType, WebhookEvent, room_event
from services.webhooks.outbox import MemoryOutbox, Outbox, Transition
from services.webhooks.redis_outbox import open_redis_outbox
from tests.ports import free_port

ENDPOINTS = ("a", "b")
T0 = 1_700_000_000.0


@pytest_asyncio.fixture(params=["memory", "redis"])
async def outbox(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Outbox]:
    if request.param == "memory":
        yield MemoryOutbox(ENDPOINTS)
        return
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    store = open_redis_outbox(redis_url, namespace, ENDPOINTS)
    yield store
    await store.close()
    async with redis.Redis.from_url(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"fanout:{namespace}:*")]
        if keys:
            await client.delete(*keys)


def event(kind: EventType = EventType.ROOM_LIVE, at: float = T0) -> WebhookEvent:
    return room_event(kind, "main", at)


async def test_an_event_goes_out_once_per_change_of_the_rooms_state(outbox: Outbox) -> None:
    assert await outbox.record("main", Transition.set("publishing", "live"), event())
    # The same change again (a restarted source, a second replica): nothing new.
    assert not await outbox.record("main", Transition.set("publishing", "live"), event())
    assert await outbox.record("main", Transition.set("publishing", "standby"), event(EventType.ROOM_STANDBY))
    assert await outbox.record("main", Transition.set("stage:x"), None)  # state only
    assert await outbox.record("main", Transition.unset("stage:x"), event(EventType.STAGE_REMOVED))
    assert not await outbox.record("main", Transition.unset("stage:x"), event(EventType.STAGE_REMOVED))
    assert await outbox.record("main", Transition.end(), event(EventType.ROOM_ENDED))
    # The room's state is gone with it: it ends once, and a new room of that name starts afresh.
    assert not await outbox.record("main", Transition.end(), event(EventType.ROOM_ENDED))
    assert await outbox.record("main", Transition.set("publishing", "live"), event())
    backlog = await outbox.backlog("a")
    assert backlog.pending == 5  # live, standby, removed, ended, live
    assert backlog.oldest_created_at == T0


async def test_each_endpoint_has_its_own_queue(outbox: Outbox) -> None:
    recorded = event()
    await outbox.record("main", Transition.set("publishing", "live"), recorded)
    [delivery] = await outbox.claim("a", T0, 10, T0 + 30)
    assert (delivery.event_id, delivery.body, delivery.created_at, delivery.attempts) == (
        recorded.id,
        recorded.body(),
        T0,
        0,
    )
    assert await outbox.finish("a", recorded.id)
    assert not await outbox.finish("a", recorded.id)  # a second dispatcher's late answer changes nothing
    assert (await outbox.backlog("a")).pending == 0
    # Endpoint b still has it, body and all.
    [delivery] = await outbox.claim("b", T0, 10, T0 + 30)
    assert delivery.body == recorded.body()
    assert await outbox.finish("b", recorded.id)
    assert await outbox.claim("b", T0 + 3600, 10, T0 + 3630) == []


async def test_a_claim_hides_a_delivery_until_its_lease_ends(outbox: Outbox) -> None:
    recorded = event()
    await outbox.record("main", Transition.set("publishing", "live"), recorded)
    assert len(await outbox.claim("a", T0 + 1, 10, T0 + 16)) == 1
    assert await outbox.claim("a", T0 + 15, 10, T0 + 30) == []
    # The dispatcher that held it died: it comes due again, not lost.
    [again] = await outbox.claim("a", T0 + 16, 10, T0 + 31)
    assert again.event_id == recorded.id


async def test_a_retry_counts_the_failure_and_comes_due_later(outbox: Outbox) -> None:
    recorded = event()
    await outbox.record("main", Transition.set("publishing", "live"), recorded)
    await outbox.claim("a", T0, 10, T0 + 30)
    await outbox.retry("a", recorded.id, T0 + 2)
    backlog = await outbox.backlog("a")
    assert (backlog.pending, backlog.next_due_at) == (1, T0 + 2)
    assert await outbox.claim("a", T0 + 1, 10, T0 + 31) == []
    [delivery] = await outbox.claim("a", T0 + 2, 10, T0 + 32)
    assert delivery.attempts == 1


async def test_claims_come_in_the_order_events_were_recorded(outbox: Outbox) -> None:
    recorded = [event(EventType.STAGE_ADDED) for _ in range(5)]
    for index, item in enumerate(recorded):
        await outbox.record("main", Transition.set(f"stage:{index}"), item)
    claimed = await outbox.claim("a", T0, 3, T0 + 30)
    claimed += await outbox.claim("a", T0, 3, T0 + 30)
    assert [d.event_id for d in claimed] == [e.id for e in recorded]


async def test_an_unreachable_redis_is_unavailable_not_a_crash() -> None:
    store = open_redis_outbox(f"redis://127.0.0.1:{free_port()}/0", "test-down", ENDPOINTS)
    try:
        with pytest.raises(Unavailable):
            await store.record("main", Transition.set("publishing", "live"), event())
        with pytest.raises(Unavailable):
            await store.backlog("a")
    finally:
        await store.close()


async def test_a_claim_is_renewed_only_while_nobody_else_took_it_over(outbox: Outbox) -> None:
    first, second = event(EventType.STAGE_ADDED), event(EventType.STAGE_ADDED)
    await outbox.record("main", Transition.set("stage:1"), first)
    await outbox.record("main", Transition.set("stage:2"), second)
    held = T0 + 15
    assert len(await outbox.claim("a", T0, 10, held)) == 2
    # The first attempt took long: before the second, its claim is extended.
    assert await outbox.renew("a", second.id, held, T0 + 40)
    # Another dispatcher claimed the first one after its claim ran out: the old holder cannot renew it.
    [taken] = await outbox.claim("a", T0 + 20, 10, T0 + 35)
    assert taken.event_id == first.id
    assert not await outbox.renew("a", first.id, held, T0 + 50)
    assert not await outbox.renew("a", "msg_unknown", held, T0 + 50)
