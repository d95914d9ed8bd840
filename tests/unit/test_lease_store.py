"""The lease store contract (placement, stickiness, expiry, release) on the memory store; concurrency."""

from __future__ import annotations

import asyncio
import gc
import random
from collections import Counter

import pytest

from services.allocator.placement import Candidate
from services.allocator.store import Assignment, Lease, LeaseStore, MemoryLeaseStore

ROOM = "main"
LEASE = 60.0
T0 = 1_700_000_000.0


def stage(i: int, observed: int = 0) -> Candidate:
    return Candidate(f"arn:aws:ivs:us-east-1:123456789012:stage/s{i}", i, observed)


A, B, C = stage(0), stage(1), stage(2)
ALL = [A, B, C]
EXISTING = {c.stage_arn for c in ALL}


async def assign(
    store: LeaseStore,
    user: str,
    candidates: list[Candidate] = ALL,
    *,
    keep_on: set[str] | None = None,
    soft: int = 2,
    hard: int = 3,
    now: float = T0,
) -> Assignment | None:
    return await store.assign(
        ROOM, user, candidates, EXISTING if keep_on is None else keep_on, soft, hard, LEASE, now
    )


class LeaseStoreContract:
    """What every `LeaseStore` does, run against each store by a `Test...` subclass providing `store`.

    Not collected itself (no `Test` prefix); tests/integration/test_redis_lease_store.py reuses it.
    """

    async def test_new_viewers_fill_least_loaded_with_ties_to_lowest_index(self, store: LeaseStore) -> None:
        placed = [await assign(store, f"u{i}", soft=10, hard=10) for i in range(5)]
        assert [p.lease.stage_arn for p in placed if p] == [s.stage_arn for s in (A, B, C, A, B)]
        assert all(p is not None and not p.sticky for p in placed)
        assert await store.counts(ROOM, T0) == {A.stage_arn: 2, B.stage_arn: 2, C.stage_arn: 1}

    async def test_lease_fields(self, store: LeaseStore) -> None:
        result = await assign(store, "u1")
        assert result == Assignment(Lease(ROOM, "u1", A.stage_arn, T0 + LEASE), sticky=False)

    async def test_soft_capacity_then_overflow_then_refusal(self, store: LeaseStore) -> None:
        # A has 2 viewers observed without leases (soft capacity 2): B fills to 2 first; then both are at
        # soft capacity and ties go to A, whose first two leases only catch up with what was observed.
        cands = [stage(0, observed=2), B]
        arns = []
        for i in range(6):
            result = await assign(store, f"u{i}", cands, soft=2, hard=3)
            assert result is not None
            arns.append(result.lease.stage_arn)
        a, b = A.stage_arn, B.stage_arn
        assert arns == [b, b, a, a, a, b]
        assert await assign(store, "late", cands, soft=2, hard=3) is None
        assert await store.counts(ROOM, T0) == {a: 3, b: 3}

    async def test_refusal_changes_nothing_even_for_a_viewer_with_an_old_lease(
        self, store: LeaseStore
    ) -> None:
        old = await assign(store, "mover", [A], soft=1, hard=1)
        assert old is not None
        assert await assign(store, "other", [B], soft=1, hard=1) is not None
        # mover's stage A is gone (not in keep_on) and B is full: refused, and its old lease stays.
        assert await assign(store, "mover", [B], keep_on={B.stage_arn}, soft=1, hard=1) is None
        assert await store.counts(ROOM, T0) == {A.stage_arn: 1, B.stage_arn: 1}

    async def test_sticky_viewer_keeps_stage_is_not_counted_twice_and_is_extended(
        self, store: LeaseStore
    ) -> None:
        first = await assign(store, "u1")
        await assign(store, "u2")
        again = await assign(store, "u1", now=T0 + 30)
        assert first is not None and again is not None
        assert again.sticky
        assert again.lease.stage_arn == first.lease.stage_arn
        assert again.lease.expires_at == T0 + 30 + LEASE
        assert await store.counts(ROOM, T0 + 30) == {A.stage_arn: 1, B.stage_arn: 1}
        # the extension is real: past the first expiry the lease still counts.
        assert await store.counts(ROOM, T0 + LEASE + 1) == {A.stage_arn: 1}

    async def test_sticky_holds_on_a_draining_stage_that_is_no_longer_a_candidate(
        self, store: LeaseStore
    ) -> None:
        await assign(store, "u1")
        again = await assign(store, "u1", [B, C], keep_on=EXISTING)
        assert again is not None and again.sticky and again.lease.stage_arn == A.stage_arn

    async def test_sticky_holds_even_on_a_full_stage(self, store: LeaseStore) -> None:
        for user in ("u1", "u2", "u3"):
            await assign(store, user, [A], soft=3, hard=3)
        again = await assign(store, "u1", [A], soft=3, hard=3)
        assert again is not None and again.sticky
        assert await store.counts(ROOM, T0) == {A.stage_arn: 3}

    async def test_lease_on_a_stage_not_in_keep_on_is_moved(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        moved = await assign(store, "u1", [B, C], keep_on={B.stage_arn, C.stage_arn})
        assert moved is not None
        assert not moved.sticky
        assert moved.lease.stage_arn == B.stage_arn
        assert await store.counts(ROOM, T0) == {B.stage_arn: 1}

    async def test_moved_viewer_does_not_weigh_on_its_own_old_stage(self, store: LeaseStore) -> None:
        await assign(store, "u1", [A])
        # A leaves keep_on but stays a candidate: without u1's own lease A is as empty as B, and wins the tie.
        moved = await assign(store, "u1", [A, B], keep_on={B.stage_arn})
        assert moved is not None and not moved.sticky and moved.lease.stage_arn == A.stage_arn
        # Likewise at the hard limit: u1's own seat is free for it.
        again = await assign(store, "u1", [A], keep_on=set(), soft=1, hard=1)
        assert again is not None and again.lease.stage_arn == A.stage_arn
        assert await store.counts(ROOM, T0) == {A.stage_arn: 1}

    async def test_expired_leases_do_not_count_before_they_are_reaped(self, store: LeaseStore) -> None:
        await assign(store, "u1", [A], soft=1, hard=1)
        assert await assign(store, "u2", [A], soft=1, hard=1, now=T0 + LEASE - 1) is None
        # at exactly expires_at the lease is over
        placed = await assign(store, "u2", [A], soft=1, hard=1, now=T0 + LEASE)
        assert placed is not None and placed.lease.stage_arn == A.stage_arn

    async def test_expired_lease_is_not_sticky_and_not_counted_twice(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        later = T0 + LEASE + 5
        again = await assign(store, "u1", now=later)
        assert again is not None and not again.sticky
        assert await store.counts(ROOM, later) == {A.stage_arn: 1}

    async def test_renew_extends_a_live_lease_only(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        renewed = await store.renew(ROOM, "u1", LEASE, T0 + 50)
        assert renewed == Lease(ROOM, "u1", A.stage_arn, T0 + 50 + LEASE)
        assert await store.counts(ROOM, T0 + LEASE + 10) == {A.stage_arn: 1}
        assert await store.renew(ROOM, "u1", LEASE, T0 + 50 + LEASE) is None
        assert await store.renew(ROOM, "nobody", LEASE, T0) is None
        assert await store.renew("elsewhere", "u1", LEASE, T0) is None

    async def test_renew_fails_on_expired_lease_even_if_not_reaped(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        assert await store.renew(ROOM, "u1", LEASE, T0 + LEASE + 1) is None
        assert await store.counts(ROOM, T0 + LEASE + 1) == {}

    async def test_reap_removes_and_returns_expired_leases_once(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        await assign(store, "u2", now=T0 + 10)
        await store.renew(ROOM, "u1", LEASE, T0 + 20)  # u1 now expires after u2
        assert await store.reap(T0 + LEASE + 5) == []
        assert await store.reap(T0 + LEASE + 10) == [Lease(ROOM, "u2", B.stage_arn, T0 + 10 + LEASE)]
        assert await store.reap(T0 + LEASE + 10) == []
        assert await store.counts(ROOM, T0) == {A.stage_arn: 1}
        assert await store.reap(T0 + 20 + LEASE) == [Lease(ROOM, "u1", A.stage_arn, T0 + 20 + LEASE)]
        assert await store.rooms_counts(T0) == {}

    async def test_reap_reports_leases_other_calls_expired_on_their_way(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        assert await store.counts(ROOM, T0 + LEASE) == {}
        assert await store.reap(T0 + LEASE) == [Lease(ROOM, "u1", A.stage_arn, T0 + LEASE)]

    async def test_many_renewals_keep_one_live_lease(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        for step in range(1, 500):
            assert await store.renew(ROOM, "u1", LEASE, T0 + step) is not None
        assert await store.reap(T0 + 499 + LEASE - 1) == []
        assert await store.reap(T0 + 499 + LEASE) == [Lease(ROOM, "u1", A.stage_arn, T0 + 499 + LEASE)]

    async def test_release_is_idempotent(self, store: LeaseStore) -> None:
        await assign(store, "u1")
        assert await store.release(ROOM, "u1") is True
        assert await store.release(ROOM, "u1") is False
        assert await store.release("elsewhere", "u1") is False
        assert await store.counts(ROOM, T0) == {}
        assert await store.renew(ROOM, "u1", LEASE, T0) is None
        assert await store.reap(T0 + 2 * LEASE) == []

    async def test_drop_stage_removes_its_leases_only(self, store: LeaseStore) -> None:
        for i in range(5):
            await assign(store, f"u{i}", soft=10, hard=10)
        assert await store.drop_stage(ROOM, A.stage_arn) == 2
        assert await store.drop_stage(ROOM, A.stage_arn) == 0
        assert await store.counts(ROOM, T0) == {B.stage_arn: 2, C.stage_arn: 1}
        assert await store.renew(ROOM, "u0", LEASE, T0) is None
        assert await store.reap(T0 + 2 * LEASE) == [
            Lease(ROOM, u, arn, T0 + LEASE)
            for u, arn in sorted([("u1", B.stage_arn), ("u2", C.stage_arn), ("u4", B.stage_arn)])
        ]

    async def test_drop_room_removes_every_lease_of_that_room_only(self, store: LeaseStore) -> None:
        for i in range(5):
            await assign(store, f"u{i}", soft=10, hard=10)
        await store.assign("other", "u0", [A], {A.stage_arn}, 1, 1, LEASE, T0)
        assert await store.drop_room(ROOM) == 5
        assert await store.drop_room(ROOM) == 0
        assert await store.counts(ROOM, T0) == {}
        assert await store.renew(ROOM, "u1", LEASE, T0) is None
        assert await store.rooms_counts(T0) == {"other": {A.stage_arn: 1}}
        # A viewer can join the room again from scratch, and nothing of the old leases is reported.
        again = await assign(store, "u1", soft=10, hard=10)
        assert again is not None and not again.sticky
        assert sorted(await store.reap(T0 + 2 * LEASE), key=lambda lease: lease.room) == [
            Lease(ROOM, "u1", A.stage_arn, T0 + LEASE),
            Lease("other", "u0", A.stage_arn, T0 + LEASE),
        ]

    async def test_the_region_quota_counts_every_room_together(self, store: LeaseStore) -> None:
        async def join(room: str, user: str, keep_on: set[str] = EXISTING) -> Assignment | None:
            return await store.assign(room, user, ALL, keep_on, 10, 10, LEASE, T0, region_quota=3)

        assert await join("r1", "a") is not None
        assert await join("r1", "b") is not None
        assert await join("r2", "c") is not None
        assert await join("r2", "d") is None, "a 4th viewer anywhere in the region is refused"
        assert await store.counts("r2", T0) == {A.stage_arn: 1}, "a refusal changes nothing"
        assert await store.region_leases(T0) == 3
        sticky = await join("r1", "a")
        assert sticky is not None and sticky.sticky, "a viewer already counted keeps its seat"
        moved = await join("r1", "b", keep_on=set())
        assert moved is not None and not moved.sticky, "moving Stages is no new subscription"
        assert await store.release("r2", "c")
        assert await join("r2", "d") is not None
        assert await store.drop_room("r1") == 2
        assert await store.region_leases(T0) == 1
        assert await join("r1", "e") is not None and await join("r1", "f") is not None
        assert await store.drop_stage("r1", A.stage_arn) + await store.drop_stage("r1", B.stage_arn) == 2
        assert await store.region_leases(T0) == 1
        await store.reap(T0 + 2 * LEASE)
        assert await store.region_leases(T0 + 2 * LEASE) == 0, "expired leases leave the count"
        await store.close()

    async def test_rooms_are_independent(self, store: LeaseStore) -> None:
        await store.assign("r1", "u1", [A], {A.stage_arn}, 1, 1, LEASE, T0)
        assert await store.assign("r2", "u1", [A], {A.stage_arn}, 1, 1, LEASE, T0) is not None
        assert await store.rooms_counts(T0) == {"r1": {A.stage_arn: 1}, "r2": {A.stage_arn: 1}}
        assert await store.counts("r3", T0) == {}
        await store.close()


class TestMemoryLeaseStore(LeaseStoreContract):
    @pytest.fixture
    def store(self) -> LeaseStore:
        return MemoryLeaseStore()

    async def test_an_audience_of_leases_adds_nothing_to_a_full_garbage_collection(
        self, store: LeaseStore
    ) -> None:
        # Every full collection walks each object the collector tracks: with a Lease object per viewer
        # an allocator holding 100,000 viewers paused ~13 ms per full pass, enough to break the p99.
        big = [stage(i) for i in range(4)]
        gc.collect()
        tracked_before = len(gc.get_objects())
        for i in range(10_000):
            placed = await store.assign(ROOM, f"u{i}", big, set(), 10_000, 10_000, LEASE, T0)
            assert placed is not None
        for i in range(0, 10_000, 2):
            assert await store.renew(ROOM, f"u{i}", LEASE, T0 + 1) is not None
        gc.collect()
        assert len(gc.get_objects()) - tracked_before < 100
        assert sum((await store.counts(ROOM, T0 + 1)).values()) == 10_000


@pytest.mark.parametrize("seed", range(8))
async def test_concurrent_assigns_keep_balance_and_count_each_viewer_once(seed: int) -> None:
    rng = random.Random(seed)
    soft, hard = 5, 10
    cands = [stage(i, observed=rng.choice([0, 0, 3, 6])) for i in range(3)]
    store = MemoryLeaseStore()
    holders: dict[str, str] = {}  # user -> stage of its lease, per the results seen
    seen: Counter[str] = Counter()

    def occupancy(counts: dict[str, int], c: Candidate) -> int:
        return max(counts.get(c.stage_arn, 0), c.observed)

    async def viewer(user: str) -> None:
        for _ in range(rng.randint(1, 3)):
            await asyncio.sleep(rng.random() / 1000)
            if user in holders and rng.random() < 0.3:
                assert await store.release(ROOM, user)
                del holders[user]
                continue
            # The memory store never suspends inside a call, so these three steps run as one.
            before = await store.counts(ROOM, T0)
            result = await store.assign(
                ROOM, user, cands, {c.stage_arn for c in cands}, soft, hard, LEASE, T0
            )
            after = await store.counts(ROOM, T0)
            if result is None:
                seen["refused"] += 1
                assert user not in holders
                assert all(occupancy(before, c) >= hard for c in cands)
                assert after == before
                continue
            arn = result.lease.stage_arn
            if result.sticky:
                seen["sticky"] += 1
                assert holders[user] == arn
                assert after == before
                continue
            assert user not in holders
            chosen = next(c for c in cands if c.stage_arn == arn)
            load = occupancy(before, chosen)
            assert load < hard
            for other in cands:
                if occupancy(before, other) < hard:
                    assert (load, chosen.index) <= (occupancy(before, other), other.index)
            if load >= soft:
                seen["overflow"] += 1
                assert all(occupancy(before, c) >= soft for c in cands)
            holders[user] = arn

    await asyncio.gather(*(viewer(f"viewer-{i}") for i in range(40)))

    counts = await store.counts(ROOM, T0)
    assert counts == dict(Counter(holders.values()))
    assert sum(counts.values()) == len(holders)
    assert all(n <= hard for n in counts.values())
    # The scenario reached every regime it claims to check.
    assert seen["sticky"] and seen["overflow"] and seen["refused"], seen
