"""The distributed `LeaseStore`: leases in Redis, each decision one Lua script, shared by allocator replicas.

Key layout, every key under `fanout:<cluster>:` so that deployments sharing a Redis never collide.
A room's keys carry the hash tag `{<room>}`, so they live in one Redis Cluster slot and every per-room
script touches a single slot:

- `room:{R}:leases`        hash  user -> "<stage arn>|<expires_at>"
- `room:{R}:expiry`        zset  user scored by expires_at (lazy expiry pops from its low end)
- `room:{R}:counts`        hash  stage arn -> live leases (a field is removed at 0)
- `room:{R}:stage:<arn>`   set   users leased on that Stage (so `drop_stage` needs no scan)
- `room:{R}:joins`         int   new placements (not sticky renewals) since the store began
- `room:{R}:reaped`        list  "<arn>|<expires_at>|<user>" expired but not yet reported by `reap`,
                                 capped to its newest `max_unreported_expired` entries
- `region-leases`          int   leases in every room together: the regional concurrent-subscription
                                 quota's count. Every script updates it beside the room's own keys, so
                                 the quota holds across rooms and allocator replicas. It is the one key
                                 outside the room's slot a script touches: on Redis Cluster, give the
                                 namespace one slot (a single primary carries this system easily).

Two keys span rooms; they are only written beside a script, never inside one:

- `rooms`        zset  room scored by the latest expiry ever leased in it. `ZADD GT` with the new
                       expiry goes with every assign and renew, and `reap(now)` drops rooms scored
                       <= now only after draining them: a room with a live lease always scores above
                       any `now` that could drop it, so the index never loses a live lease.
- `joined-rooms` set   every room that ever had a placement: where `joins()` looks.

Time is always the caller's `now` (never Redis TIME), and expiries are computed in Python and passed
as exact float strings, so this store and the memory store agree to the bit. The placement loop in
the assign script mirrors `placement.choose_stage`: least occupancy = max(leased, observed) below the
hard limit, ties by lowest index, then stage ARN.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, Lease
from services.allocator.store_guard import GuardedLeaseStore
from services.common.redis_clients import open_redis
from services.common.timeouts import STORE_CALL_SECONDS, STORE_PROBE_SECONDS

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
# What an unreachable Redis looks like; any other RedisError (a script error) is a bug, not an outage.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)

# Shared by every script: KEYS[1] leases, KEYS[2] expiry, KEYS[3] counts, KEYS[4] reaped, KEYS[5]
# region-leases; ARGV[1] the room's per-Stage set key prefix. Per-Stage keys are built from it, in the
# room's slot.
_COMMON = """
local leases, expiry, counts, reaped, region = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local stage_prefix = ARGV[1]

local function parse(value)
  local bar = string.find(value, '|', 1, true)
  return string.sub(value, 1, bar - 1), string.sub(value, bar + 1)
end

local function remove(user, arn)
  if redis.call('HDEL', leases, user) == 1 then
    redis.call('DECR', region)
  end
  redis.call('ZREM', expiry, user)
  redis.call('SREM', stage_prefix .. arn, user)
  if redis.call('HINCRBY', counts, arn, -1) <= 0 then
    redis.call('HDEL', counts, arn)
  end
end

local function put(user, arn, expires)
  if redis.call('HSET', leases, user, arn .. '|' .. expires) == 1 then
    redis.call('INCR', region)
  end
  redis.call('ZADD', expiry, expires, user)
  if redis.call('SADD', stage_prefix .. arn, user) == 1 then
    redis.call('HINCRBY', counts, arn, 1)
  end
end

-- Removes leases with expires_at <= now, in (expiry, user) order, keeping them for `reap`.
local function expire(now, max_reaped)
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  for _, user in ipairs(gone) do
    local value = redis.call('HGET', leases, user)
    if value then
      local arn = parse(value)
      remove(user, arn)
      redis.call('RPUSH', reaped, value .. '|' .. user)
    else
      redis.call('ZREM', expiry, user)
    end
  end
  if #gone > 0 then
    redis.call('LTRIM', reaped, -max_reaped, -1)
  end
end
"""

# ARGV: 1 stage prefix, 2 user, 3 now, 4 new expiry, 5 hard limit, 6 max reaped, 7 region quota
# (0: none), 8 n keep_on, then keep_on arns, then (arn, index, observed) per candidate. KEYS[6] joins.
# Returns {sticky 0/1, arn, expires} or false when nothing can take the viewer.
_ASSIGN = (
    _COMMON
    + """
local user, now, expires = ARGV[2], ARGV[3], ARGV[4]
local hard = tonumber(ARGV[5])
expire(now, tonumber(ARGV[6]))
local quota = tonumber(ARGV[7])
local n_keep = tonumber(ARGV[8])
local current = redis.call('HGET', leases, user)
local current_arn = nil
if current then
  current_arn = parse(current)
  for i = 9, 8 + n_keep do
    if ARGV[i] == current_arn then
      put(user, current_arn, expires)
      return {1, current_arn, expires}
    end
  end
elseif quota > 0 and tonumber(redis.call('GET', region) or '0') >= quota then
  -- A new viewer is one more subscription in the region; one moving Stages is not.
  return false
end
local best_arn, best_load, best_index = nil, nil, nil
for i = 9 + n_keep, #ARGV, 3 do
  local arn, index, observed = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local leased = tonumber(redis.call('HGET', counts, arn) or '0')
  if arn == current_arn then
    leased = leased - 1
  end
  local load = math.max(leased, observed)
  if load < hard then
    if best_arn == nil or load < best_load or (load == best_load and (index < best_index
        or (index == best_index and arn < best_arn))) then
      best_arn, best_load, best_index = arn, load, index
    end
  end
end
if best_arn == nil then
  return false
end
if current_arn then
  remove(user, current_arn)
end
put(user, best_arn, expires)
redis.call('INCR', KEYS[6])
return {0, best_arn, expires}
"""
)

# ARGV: 1 stage prefix, 2 user, 3 now, 4 new expiry, 5 max reaped. Returns the arn or false.
_RENEW = (
    _COMMON
    + """
expire(ARGV[3], tonumber(ARGV[5]))
local current = redis.call('HGET', leases, ARGV[2])
if not current then
  return false
end
local arn = parse(current)
put(ARGV[2], arn, ARGV[4])
return arn
"""
)

# ARGV: 1 stage prefix, 2 user. Returns 1 if there was a lease.
_RELEASE = (
    _COMMON
    + """
local current = redis.call('HGET', leases, ARGV[2])
if not current then
  return 0
end
remove(ARGV[2], (parse(current)))
return 1
"""
)

# ARGV: 1 stage prefix, 2 now, 3 max reaped. Returns the counts hash as a flat list.
_COUNTS = (
    _COMMON
    + """
expire(ARGV[2], tonumber(ARGV[3]))
return redis.call('HGETALL', counts)
"""
)

# ARGV: 1 stage prefix, 2 now, 3 max reaped. Returns and clears the room's unreported expired leases.
_REAP = (
    _COMMON
    + """
expire(ARGV[2], tonumber(ARGV[3]))
local entries = redis.call('LRANGE', reaped, 0, -1)
redis.call('DEL', reaped)
return entries
"""
)

# ARGV: 1 stage prefix, 2 stage arn. Returns how many leases were removed.
_DROP_STAGE = (
    _COMMON
    + """
local key = stage_prefix .. ARGV[2]
local users = redis.call('SMEMBERS', key)
for _, user in ipairs(users) do
  if redis.call('HDEL', leases, user) == 1 then
    redis.call('DECR', region)
  end
  redis.call('ZREM', expiry, user)
end
redis.call('DEL', key)
redis.call('HDEL', counts, ARGV[2])
return #users
"""
)

# ARGV: 1 stage prefix. Returns how many leases the room had. Every non-empty per-Stage set has a
# field in counts, so no key is left behind.
_DROP_ROOM = (
    _COMMON
    + """
for _, arn in ipairs(redis.call('HKEYS', counts)) do
  redis.call('DEL', stage_prefix .. arn)
end
local n = redis.call('HLEN', leases)
redis.call('DEL', leases, expiry, counts)
redis.call('DECRBY', region, n)
return n
"""
)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisLeaseStore:
    """`LeaseStore` on Redis: one Lua script per call, so replicas sharing a namespace share one truth."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        max_unreported_expired: int = 65_536,
        probe_client: redis.Redis | None = None,
    ) -> None:
        self._client = client
        # `ping` on a connection of its own: a pool busy with requests must not look like Redis down.
        self._probe_client = probe_client or client
        self._prefix = f"fanout:{namespace}:"
        self._max_reaped = str(max_unreported_expired)
        self._rooms_key = self._prefix + "rooms"
        self._joined_key = self._prefix + "joined-rooms"
        self._region_key = self._prefix + "region-leases"
        self._assign = client.register_script(_ASSIGN)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._counts = client.register_script(_COUNTS)
        self._reap = client.register_script(_REAP)
        self._drop_stage = client.register_script(_DROP_STAGE)
        self._drop_room = client.register_script(_DROP_ROOM)

    def _room_keys(self, room: str) -> tuple[list[str], str]:
        base = f"{self._prefix}room:{{{room}}}:"
        keys = [base + "leases", base + "expiry", base + "counts", base + "reaped", self._region_key]
        return keys, base + "stage:"

    def _joins_key(self, room: str) -> str:
        return f"{self._prefix}room:{{{room}}}:joins"

    async def _indexed(self, script: Any, keys: list[str], args: list[Any], room: str, score: str) -> Any:
        """Runs `script` in one round trip with the room-index updates that go with a new expiry."""
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(self._rooms_key, {room: score}, gt=True)
            pipe.sadd(self._joined_key, room)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return (await pipe.execute())[-1]
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._client.script_load(script.script)
        raise AssertionError("unreachable")

    async def assign(
        self,
        room: str,
        user_id: str,
        candidates: Sequence[Candidate],
        keep_on: Collection[str],
        soft_capacity: int,
        hard_limit: int,
        lease_seconds: float,
        now: float,
        region_quota: int = 0,
    ) -> Assignment | None:
        if soft_capacity < 1:
            raise ValueError(f"soft capacity must be at least 1, got {soft_capacity}")
        if hard_limit < soft_capacity:
            raise ValueError(f"hard limit {hard_limit} is below soft capacity {soft_capacity}")
        keys, stage_prefix = self._room_keys(room)
        expires = repr(float(now + lease_seconds))
        keep = list(keep_on)
        args: list[Any] = [stage_prefix, user_id, repr(float(now)), expires, hard_limit, self._max_reaped]
        args += [region_quota, len(keep), *keep]
        for candidate in candidates:
            args += [candidate.stage_arn, candidate.index, candidate.observed]
        result = await self._indexed(self._assign, [*keys, self._joins_key(room)], args, room, expires)
        if not result:
            return None
        sticky, arn, expires_at = result
        return Assignment(Lease(room, user_id, _text(arn), float(expires_at)), sticky=bool(sticky))

    async def renew(self, room: str, user_id: str, lease_seconds: float, now: float) -> Lease | None:
        keys, stage_prefix = self._room_keys(room)
        expires = repr(float(now + lease_seconds))
        args = [stage_prefix, user_id, repr(float(now)), expires, self._max_reaped]
        arn = await self._indexed(self._renew, keys, args, room, expires)
        if not arn:
            return None
        return Lease(room, user_id, _text(arn), float(expires))

    async def release(self, room: str, user_id: str) -> bool:
        keys, stage_prefix = self._room_keys(room)
        return bool(await self._release(keys, [stage_prefix, user_id]))

    async def counts(self, room: str, now: float) -> dict[str, int]:
        keys, stage_prefix = self._room_keys(room)
        flat = await self._counts(keys, [stage_prefix, repr(float(now)), self._max_reaped])
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def _live_rooms(self) -> list[str]:
        rooms: Any = await self._client.zrange(self._rooms_key, 0, -1)
        return [_text(room) for room in rooms]

    async def rooms_counts(self, now: float) -> dict[str, dict[str, int]]:
        rooms = await self._live_rooms()
        counts = await asyncio.gather(*(self.counts(room, now) for room in rooms))
        return {room: room_counts for room, room_counts in zip(rooms, counts, strict=True) if room_counts}

    async def reap(self, now: float) -> list[Lease]:
        rooms = await self._live_rooms()

        async def reap_room(room: str) -> list[Lease]:
            keys, stage_prefix = self._room_keys(room)
            entries = await self._reap(keys, [stage_prefix, repr(float(now)), self._max_reaped])
            leases = []
            for entry in entries:
                arn, expires_at, user_id = _text(entry).split("|", 2)
                leases.append(Lease(room, user_id, arn, float(expires_at)))
            return leases

        reaped = await asyncio.gather(*(reap_room(room) for room in rooms))
        # Only now, with their expired leases drained, may rooms without live leases leave the index.
        await self._client.zremrangebyscore(self._rooms_key, "-inf", repr(float(now)))
        return [lease for leases in reaped for lease in leases]

    async def drop_stage(self, room: str, stage_arn: str) -> int:
        keys, stage_prefix = self._room_keys(room)
        return int(await self._drop_stage(keys, [stage_prefix, stage_arn]))

    async def drop_room(self, room: str) -> int:
        keys, stage_prefix = self._room_keys(room)
        return int(await self._drop_room(keys, [stage_prefix]))

    async def region_leases(self, now: float) -> int:
        # Expired leases leave the count when their room is next touched or reaped (every second):
        # until then they count, which errs on the side of the quota.
        return int(await self._client.get(self._region_key) or 0)

    async def joins(self) -> dict[str, int]:
        rooms = sorted(_text(room) for room in await self._client.smembers(self._joined_key))
        if not rooms:
            return {}
        values = await self._client.mget([self._joins_key(room) for room in rooms])
        return {room: int(value) for room, value in zip(rooms, values, strict=True) if value is not None}

    async def ping(self) -> None:
        """Raises a `redis.RedisError` unless Redis answers."""
        await self._probe_client.ping()

    async def close(self) -> None:
        await self._client.aclose()
        if self._probe_client is not self._client:
            await self._probe_client.aclose()


def open_redis_client(
    url: str, max_connections: int = MAX_CONNECTIONS, timeout: float = STORE_CALL_SECONDS
) -> redis.Redis:
    """In the allocator no wait (for a connection, a connect or an answer) outlasts one store call's
    deadline."""
    return open_redis(url, timeout, max_connections)


def open_redis_store(url: str, namespace: str) -> GuardedLeaseStore:
    """The allocator's Redis lease store, guarded so that a Redis outage answers 503s, not errors."""
    return GuardedLeaseStore(
        RedisLeaseStore(open_redis_client(url), namespace, probe_client=open_redis_client(url, 1)),
        OUTAGE_ERRORS,
        call_timeout=STORE_CALL_SECONDS,
        probe_interval=STORE_PROBE_SECONDS,
        name="Redis lease store",
    )
