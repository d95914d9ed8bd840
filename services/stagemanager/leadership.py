"""Which stage manager replica acts: a lease with a fencing token in the deployment's Redis.

Exactly one replica leads: it runs the autoscaler, the replicator and recovery, and it alone creates,
tags, replicates and deletes Stages. Followers serve reads from the inventory the leader keeps in Redis
(shared_inventory.py) and forward writes to the leader.

The lease is a Redis key holding the leader's identity and a fencing token (a counter incremented on
every new lease), set with a TTL and renewed every TTL/3. Two fences keep a paused ex-leader (a long GC,
SIGSTOP, a partition) from acting after someone else took over:

- Every call that changes IVS checks `check()` just before it goes out: the lease must be held *by
  local time*, measured from when the last successful renewal was sent, minus a safety margin. A
  process that was paused past its lease resumes with that time run out, before any I/O.
- Every write to the shared inventory runs in a Redis script that first compares the lease's value with
  ours, so a stale leader's write is refused by Redis itself.

Losing the lease ends the process (`lost` is set): a fresh start rejoins as a follower, which is
simpler to get right than turning a leader's half-done work back into a follower's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis

from services.common.errors import Unavailable

log = logging.getLogger(__name__)


class NotLeader(Unavailable):
    """This replica may not act: it follows, or its lease ran out."""

    default_code = "not_leader"


@dataclass(frozen=True)
class LeaderInfo:
    holder: str
    token: int
    # host:port where the leader serves gRPC: followers forward writes there.
    address: str


class Leadership(Protocol):
    @property
    def is_leader(self) -> bool: ...

    def check(self) -> None:
        """Raises NotLeader unless this replica holds the lease now."""


def fence_ivs_changes(leadership: Leadership) -> Callable[[str], None]:
    """A guard for IvsCaller: every call that changes IVS (anything but Get*/List*) needs the lease."""

    def guard(operation: str) -> None:
        if not operation.startswith(("Get", "List")):
            leadership.check()

    return guard


class SoleReplica:
    """One replica, no Redis: it always leads (memory mode)."""

    is_leader = True
    token = 1

    def check(self) -> None:
        return None


# Takes the lease if free (a new token) or renews it if ours; returns the token, or 0 if another holds it.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local held = cjson.decode(current)
  if held['holder'] ~= ARGV[1] then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return held['token']
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], cjson.encode({holder=ARGV[1], token=token, address=ARGV[2]}), 'PX', ARGV[3])
return token
"""

# Renews only the exact lease we hold (same holder and token); 0 if it is gone or someone else's.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local held = cjson.decode(current)
if held['holder'] ~= ARGV[1] or tostring(held['token']) ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['holder'] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class LeaderLease:
    """This replica's part in the election: tries for the lease until it leads, then keeps it."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        holder: str,
        address: str,
        ttl_seconds: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._key = f"{namespace}:leader"
        self._fence_key = f"{namespace}:fence"
        self.holder = holder
        self._address = address
        self._ttl = ttl_seconds
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.token = 0
        # Local time until which our lease certainly holds; 0 while we do not lead.
        self._valid_until = 0.0
        self.became_leader = asyncio.Event()
        self.lost = asyncio.Event()

    @property
    def key(self) -> str:
        return self._key

    @property
    def is_leader(self) -> bool:
        return self.token > 0 and not self.lost.is_set() and self._clock() < self._valid_until

    def check(self) -> None:
        if not self.is_leader:
            raise NotLeader("this stage manager replica does not lead", retry_after=1)

    def _margin(self) -> float:
        # Redis expires the key `ttl` after it received the renewal; we count from before we sent it,
        # and keep a margin for clock rate differences.
        return max(0.2, self._ttl * 0.1)

    async def run(self) -> None:
        """Campaigns every TTL/3 until it leads, then renews every TTL/3; sets `lost` and returns when
        the lease is gone (renewal refused, or not renewed in time)."""
        interval = self._ttl / 3
        while self.token == 0:
            sent = self._clock()
            try:
                token = int(await self._acquire(keys=[self._key, self._fence_key], args=self._args()))
            except (redis.RedisError, OSError) as error:
                log.warning("leader election: Redis unavailable (%s)", error)
                token = 0
            if token:
                self.token = token
                self._valid_until = sent + self._ttl - self._margin()
                log.info("leading with fencing token %d", token)
                self.became_leader.set()
                break
            await asyncio.sleep(interval)
        while True:
            await asyncio.sleep(interval)
            sent = self._clock()
            try:
                renewed = int(
                    await self._renew(
                        keys=[self._key], args=[self.holder, str(self.token), str(int(self._ttl * 1000))]
                    )
                )
            except (redis.RedisError, OSError) as error:
                log.warning("leader lease renewal failed: %s", error)
                renewed = -1
            if renewed == 1:
                self._valid_until = sent + self._ttl - self._margin()
            elif renewed == 0 or self._clock() >= self._valid_until:
                log.error("lost the leader lease (token %d)", self.token)
                self._valid_until = 0.0
                self.lost.set()
                return

    def _args(self) -> list[str]:
        return [self.holder, self._address, str(int(self._ttl * 1000))]

    async def leader(self) -> LeaderInfo | None:
        """Who leads now, as Redis says (a follower forwards writes there)."""
        raw = await self._redis.get(self._key)
        if raw is None:
            return None
        held: dict[str, Any] = json.loads(raw)
        return LeaderInfo(str(held["holder"]), int(held["token"]), str(held["address"]))

    async def release(self) -> None:
        """Steps down at a clean shutdown, so a follower takes over at once instead of after the TTL."""
        if self.token:
            self._valid_until = 0.0
            try:
                await self._release(keys=[self._key], args=[self.holder])
            except (redis.RedisError, OSError) as error:
                log.warning("could not release the leader lease: %s", error)
