"""The outbox in Redis: events and each room's announced state survive a restart; each change is one
Lua script, so a record, a claim or a delivery's end is all-or-nothing.

Keys, under `fanout:<cluster>:{webhooks}:` (one hash tag: on Redis Cluster every script's keys share
a slot):

- `events`                  hash  event id -> body (the signed JSON), until every endpoint is done
- `refs`                    hash  event id -> endpoints still to deliver it to
- `endpoint:<key>:due`      zset  event id scored by when its next attempt is due (or its claim ends)
- `endpoint:<key>:since`    zset  event id scored by when it was recorded (give-up, oldest pending)
- `endpoint:<key>:attempts` hash  event id -> failed attempts
- `room:<room>`             hash  what the room has announced (see outbox.Transition), expiring
                                  ROOM_STATE_TTL_SECONDS after its last change
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis

from services.common.errors import Unavailable
from services.common.lifecycle import raise_if_cancelled
from services.common.redis_clients import open_redis
from services.webhooks.events import WebhookEvent
from services.webhooks.outbox import ROOM_STATE_TTL_SECONDS, Backlog, Delivery, Transition

log = logging.getLogger(__name__)

T = TypeVar("T")

# Every call to Redis: connecting, then the answer.
REDIS_CALL_SECONDS = 2.0

# KEYS[1] the room's state, KEYS[2] events, KEYS[3] refs, then due and since of each endpoint.
# ARGV: change, field, value, state TTL, event id ("" for none), body, recorded at.
_RECORD = """
local state, change, field, value = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if change == 'set' then
  if redis.call('HGET', state, field) == value then return 0 end
  redis.call('HSET', state, field, value)
  redis.call('EXPIRE', state, ARGV[4])
elseif change == 'unset' then
  if redis.call('HDEL', state, field) == 0 then return 0 end
else
  if redis.call('DEL', state) == 0 then return 0 end
end
local id = ARGV[5]
local endpoints = (#KEYS - 3) / 2
if id == '' or endpoints == 0 then return 1 end
redis.call('HSET', KEYS[2], id, ARGV[6])
redis.call('HSET', KEYS[3], id, endpoints)
for i = 0, endpoints - 1 do
  redis.call('ZADD', KEYS[4 + 2 * i], ARGV[7], id)
  redis.call('ZADD', KEYS[5 + 2 * i], ARGV[7], id)
end
return 1
"""

# KEYS: due, since, attempts, events. ARGV: now, limit, lease until.
# Returns id, body, recorded at, attempts for each claimed delivery, flattened.
_CLAIM = """
local due, since, attempts, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ids = redis.call('ZRANGEBYSCORE', due, '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local claimed = {}
for _, id in ipairs(ids) do
  local body = redis.call('HGET', events, id)
  if body then
    redis.call('ZADD', due, ARGV[3], id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = body
    claimed[#claimed + 1] = redis.call('ZSCORE', since, id) or '0'
    claimed[#claimed + 1] = redis.call('HGET', attempts, id) or '0'
  else
    redis.call('ZREM', due, id)
    redis.call('ZREM', since, id)
    redis.call('HDEL', attempts, id)
  end
end
return claimed
"""

# KEYS: due. ARGV: id, the claim's end as the claimant set it, its new end.
_RENEW = """
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not held or tonumber(held) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS: due, attempts. ARGV: id, due at.
_RETRY = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"""

# KEYS: due, since, attempts, events, refs. ARGV: id.
_FINISH = """
local id = ARGV[1]
if redis.call('ZREM', KEYS[1], id) == 0 then return 0 end
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
if redis.call('HINCRBY', KEYS[5], id, -1) <= 0 then
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[4], id)
end
return 1
"""


class RedisOutbox:
    """`Outbox` on Redis; several processes may share it (a claim keeps them off each other's work)."""

    def __init__(self, client: redis.Redis, namespace: str, endpoints: Sequence[str]) -> None:
        self._client = client
        self._prefix = f"fanout:{namespace}:{{webhooks}}:"
        self._endpoints = list(endpoints)
        self._record = client.register_script(_RECORD)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._retry = client.register_script(_RETRY)
        self._finish = client.register_script(_FINISH)

    def _queue(self, endpoint: str, part: str) -> str:
        return f"{self._prefix}endpoint:{endpoint}:{part}"

    async def record(self, room: str, transition: Transition, event: WebhookEvent | None = None) -> bool:
        keys = [f"{self._prefix}room:{room}", f"{self._prefix}events", f"{self._prefix}refs"]
        for endpoint in self._endpoints:
            keys += [self._queue(endpoint, "due"), self._queue(endpoint, "since")]
        args = [
            transition.change.value,
            transition.field,
            transition.value,
            ROOM_STATE_TTL_SECONDS,
            event.id if event else "",
            event.body() if event else "",
            repr(event.timestamp) if event else "0",
        ]
        return bool(await self._call(lambda: self._record(keys=keys, args=args)))

    async def claim(self, endpoint: str, now: float, limit: int, lease_until: float) -> list[Delivery]:
        keys = [self._queue(endpoint, part) for part in ("due", "since", "attempts")]
        keys.append(f"{self._prefix}events")
        flat = await self._call(lambda: self._claim(keys=keys, args=[repr(now), limit, repr(lease_until)]))
        return [
            Delivery(
                event_id=_text(flat[i]),
                body=_text(flat[i + 1]),
                created_at=float(flat[i + 2]),
                attempts=int(flat[i + 3]),
            )
            for i in range(0, len(flat), 4)
        ]

    async def renew(self, endpoint: str, event_id: str, held_until: float, until: float) -> bool:
        keys = [self._queue(endpoint, "due")]
        args = [event_id, repr(held_until), repr(until)]
        return bool(await self._call(lambda: self._renew(keys=keys, args=args)))

    async def retry(self, endpoint: str, event_id: str, at: float) -> None:
        keys = [self._queue(endpoint, "due"), self._queue(endpoint, "attempts")]
        await self._call(lambda: self._retry(keys=keys, args=[event_id, repr(at)]))

    async def finish(self, endpoint: str, event_id: str) -> bool:
        keys = [self._queue(endpoint, part) for part in ("due", "since", "attempts")]
        keys += [f"{self._prefix}events", f"{self._prefix}refs"]
        return bool(await self._call(lambda: self._finish(keys=keys, args=[event_id])))

    async def backlog(self, endpoint: str) -> Backlog:
        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zcard(self._queue(endpoint, "since"))
                pipe.zrange(self._queue(endpoint, "since"), 0, 0, withscores=True)
                pipe.zrange(self._queue(endpoint, "due"), 0, 0, withscores=True)
                return list(await pipe.execute())

        pending, oldest, due = await self._call(read)
        return Backlog(
            pending=int(pending),
            oldest_created_at=float(oldest[0][1]) if oldest else None,
            next_due_at=float(due[0][1]) if due else None,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as error:
            raise Unavailable(f"webhook outbox (Redis) unavailable: {type(error).__name__}") from None
        finally:
            # Without this, a stopped dispatcher would loop on forever (see raise_if_cancelled).
            raise_if_cancelled()


def open_redis_outbox(url: str, namespace: str, endpoints: Sequence[str]) -> RedisOutbox:
    client = open_redis(url, REDIS_CALL_SECONDS)
    return RedisOutbox(client, namespace, endpoints)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
