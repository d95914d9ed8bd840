"""The inventory in Redis: the leader writes every change there, followers replay them (DESIGN.md §1).

Keys, under `fanout:<cluster>:stagemanager`:

- `rooms` (hash): room id -> the room with its Stages, as JSON: the state a new follower starts from;
- `revision`: the inventory revision that state includes;
- `changes` (stream): every change in order, with its revision, so followers replay the leader's feed
  with the leader's revisions (a watcher's revisions mean the same on every replica). Capped; a
  follower that fell further behind loads `rooms` again.

The leader's writes run in one script that first checks the leader lease still holds our value, so a
stale leader's write never lands (the lease's second fence, see leadership.py). They are sent in
order, off the request path; what the leader did in its last moments and never wrote is found in IVS by
the next leader's reconciliation (RoomManager.recover).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import redis.asyncio as redis

from services.common.lifecycle import raise_if_cancelled
from services.stagemanager.inventory import Change, ChangeKind, Inventory
from services.stagemanager.leadership import LeaderLease
from services.stagemanager.model import Replication, RoomRecord, StageRecord, StageState

log = logging.getLogger(__name__)

STREAM_LENGTH = 100_000

_WRITE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local held = cjson.decode(current)
if held['holder'] ~= ARGV[1] or tostring(held['token']) ~= ARGV[2] then return 0 end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
redis.call('SET', KEYS[3], ARGV[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'change', ARGV[6])
return 1
"""


def namespace(cluster_id: str) -> str:
    return f"fanout:{cluster_id}:stagemanager"


# --- records as JSON ----------------------------------------------------------------------------


def stage_to_json(stage: StageRecord) -> dict[str, Any]:
    data = dataclasses.asdict(stage)
    data["state"] = stage.state.value
    data["replication"] = stage.replication.value
    return data


def stage_from_json(data: dict[str, Any]) -> StageRecord:
    return StageRecord(
        **{
            **data,
            "state": StageState(data["state"]),
            "replication": Replication(data.get("replication", Replication.NONE.value)),
        }
    )


def room_to_json(room: RoomRecord) -> dict[str, Any]:
    data = {f.name: getattr(room, f.name) for f in dataclasses.fields(room) if f.name != "stages"}
    data["stages"] = [stage_to_json(stage) for stage in room.stages.values()]
    return data


def room_from_json(data: dict[str, Any]) -> RoomRecord:
    fields = {k: v for k, v in data.items() if k != "stages"}
    room = RoomRecord(**fields)
    for stage in data.get("stages", []):
        record = stage_from_json(stage)
        room.stages[record.index] = record
    return room


def change_to_json(change: Change) -> str:
    return json.dumps(
        {
            "revision": change.revision,
            "kind": change.kind.value,
            "room": change.room,
            "stage": stage_to_json(change.stage) if change.stage is not None else None,
            "room_record": room_to_json(change.room_record) if change.room_record is not None else None,
        },
        separators=(",", ":"),
    )


def change_from_json(raw: str | bytes) -> Change:
    data = json.loads(raw)
    return Change(
        revision=int(data["revision"]),
        kind=ChangeKind(data["kind"]),
        room=str(data["room"]),
        stage=stage_from_json(data["stage"]) if data.get("stage") else None,
        room_record=room_from_json(data["room_record"]) if data.get("room_record") else None,
    )


# --- the leader's side --------------------------------------------------------------------------


class InventoryMirror:
    """Writes each change of the leader's inventory to Redis, in order, fenced by the lease."""

    def __init__(
        self, client: redis.Redis, cluster_id: str, inventory: Inventory, lease: LeaderLease
    ) -> None:
        self._prefix = namespace(cluster_id)
        self._inventory = inventory
        self._lease = lease
        self._write = client.register_script(_WRITE)
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        inventory.add_listener(self._queue.put_nowait)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        keys = [
            self._lease.key,
            f"{self._prefix}:rooms",
            f"{self._prefix}:revision",
            f"{self._prefix}:changes",
        ]
        failing = False
        while True:
            change = await self._queue.get()
            room = self._inventory.room(change.room)
            state = json.dumps(room_to_json(room), separators=(",", ":")) if room is not None else ""
            args = [
                self._lease.holder,
                str(self._lease.token),
                change.room,
                state,
                str(change.revision),
                change_to_json(change),
            ]
            while True:
                try:
                    written = await self._write(keys=keys, args=[*args, str(STREAM_LENGTH)])
                except (redis.RedisError, OSError) as error:
                    # Retried until it lands or the lease runs out (then the process ends anyway).
                    if not failing:
                        log.warning("cannot write the inventory to Redis: %s", error)
                    failing = True
                    await asyncio.sleep(0.2)
                    continue
                break
            if failing:
                log.info("writing the inventory to Redis again")
                failing = False
            if not written:
                log.error("Redis refused an inventory write: the leader lease is someone else's")
                self._lease.lost.set()
                return


async def clear(client: redis.Redis, cluster_id: str) -> None:
    """Forgets the shared inventory (a new leader that rebuilt it from IVS writes it afresh)."""
    prefix = namespace(cluster_id)
    await client.delete(f"{prefix}:rooms", f"{prefix}:revision", f"{prefix}:changes")


# --- a follower's side --------------------------------------------------------------------------


class InventoryFollower:
    """Keeps a follower's inventory equal to the leader's: the state in Redis, then every change."""

    def __init__(
        self, client: redis.Redis, cluster_id: str, inventory: Inventory, block_ms: int = 500
    ) -> None:
        self._redis = client
        self._prefix = namespace(cluster_id)
        self._inventory = inventory
        # Below the client's socket timeout (STORE_CALL_SECONDS), or an idle wait reads as a timeout.
        # Below the client socket timeout (STORE_CALL_SECONDS), or an idle wait reads as a timeout.
        self._block_ms = block_ms
        self._last_id = "0-0"

    async def load(self) -> bool:
        """Loads the leader's state; False when Redis has none (no leader has written one yet)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(f"{self._prefix}:rooms")
            pipe.get(f"{self._prefix}:revision")
            pipe.xrevrange(f"{self._prefix}:changes", count=1)
            rooms, revision, last = await pipe.execute()
        self._last_id = last[0][0].decode() if last else "0-0"
        if revision is None:
            # Nothing written yet: take the first leader's revisions, whatever they are.
            self._inventory.load([], 0)
            return False
        self._inventory.load([room_from_json(json.loads(raw)) for raw in rooms.values()], int(revision))
        return True

    async def leader_wrote_state(self) -> bool:
        """Whether any leader has written an inventory to Redis (else the next one rebuilds it)."""
        return bool(await self._redis.exists(f"{self._prefix}:revision"))

    async def run(self) -> None:
        """Replays new changes as they come; reloads when it fell behind the capped stream."""
        stream = f"{self._prefix}:changes"
        while True:
            try:
                answer = await self._redis.xread({stream: self._last_id}, block=self._block_ms, count=500)
            except (redis.RedisError, OSError) as error:
                log.warning("cannot follow the inventory in Redis: %s", error)
                await asyncio.sleep(0.5)
                continue
            finally:
                # A follower that wins the lease cancels this loop before taking over, and waits for it.
                raise_if_cancelled()
            await self._apply(answer)

    async def catch_up(self) -> None:
        """Replays whatever the old leader wrote that this follower has not seen yet."""
        stream = f"{self._prefix}:changes"
        while True:
            answer = await self._redis.xread({stream: self._last_id}, count=500)
            if not answer:
                return
            await self._apply(answer)

    async def _apply(self, answer: Any) -> None:
        for _, entries in answer or []:
            for entry_id, fields in entries:
                change = change_from_json(fields[b"change"])
                # Each change is one revision after the last: a jump means entries this follower never
                # read were trimmed away, or a leader rebuilt the inventory from IVS. Either way the
                # state in Redis is whole again.
                if self._inventory.revision and change.revision > self._inventory.revision + 1:
                    log.warning("missed inventory changes; loading the whole inventory again")
                    await self.load()
                    return
                self._inventory.apply(change)
                self._last_id = entry_id.decode()
