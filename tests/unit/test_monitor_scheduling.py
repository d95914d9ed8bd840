"""Fair polling: every Stage gets a bounded turn per pass, so one huge Stage cannot starve the others."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from services.common.errors import Unavailable
from services.monitor.ivs import ParticipantsPage, StageSummary
from services.monitor.metrics import MonitorMetrics
from services.monitor.monitor import StageMonitor
from services.monitor.observations import ALLOCATOR, STAGEMANAGER, Observation
from services.monitor.watchlist import Watchlist

PAGE = 100


def arn(name: str) -> str:
    return f"arn:aws:ivs:us-east-1:123456789012:stage/{name}"


def summary(name: str, session: str | None = "st-0123456789abc", cluster: str = "c1", room: str = "main"):
    tags = {"fanout:cluster": cluster, "fanout:room": room, "fanout:index": "0", "fanout:role": "origin"}
    return StageSummary(arn=arn(name), tags=tags, active_session_id=session)


class FakeIvs:
    """Stages with (publishers, subscribers) CONNECTED; pages of 100 in join order, publisher first."""

    def __init__(self) -> None:
        self.summaries: list[StageSummary] = []
        self.people: dict[str, tuple[int, int]] = {}
        self.calls: Counter[str] = Counter()
        self.pages_by_stage: Counter[str] = Counter()
        self.failing: set[str] = set()

    def add(self, name: str, publishers: int, subscribers: int, **kwargs) -> str:
        self.summaries.append(summary(name, **kwargs))
        self.people[arn(name)] = (publishers, subscribers)
        return arn(name)

    async def list_stages(self) -> list[StageSummary]:
        self.calls["ListStages"] += 1
        return list(self.summaries)

    async def active_session(self, stage_arn: str) -> str | None:
        self.calls["GetStage"] += 1
        return next(s.active_session_id for s in self.summaries if s.arn == stage_arn)

    async def connected_page(self, stage_arn: str, session_id: str, next_token: str | None):
        self.calls["ListParticipants"] += 1
        self.pages_by_stage[stage_arn] += 1
        if stage_arn in self.failing:
            raise Unavailable("IVS ListParticipants failed: InternalServerException")
        publishers, subscribers = self.people[stage_arn]
        start = int(next_token or 0)
        end = min(start + PAGE, publishers + subscribers)
        in_page_publishers = max(0, min(end, publishers) - start)
        return ParticipantsPage(
            publishers=in_page_publishers,
            subscribers=(end - start) - in_page_publishers,
            next_token=str(end) if end < publishers + subscribers else None,
        )

    async def connected_publishers(self, stage_arn: str, session_id: str) -> int:
        self.calls["ListParticipants"] += 1
        return self.people[stage_arn][0]


class RecordingReporter:
    def __init__(self) -> None:
        self.sent: dict[str, list[Observation]] = {ALLOCATOR: [], STAGEMANAGER: []}

    def submit(self, target: str, observations: Iterable[Observation]) -> None:
        self.sent[target].extend(observations)

    def latest(self, target: str, stage_arn: str) -> Observation | None:
        return next((o for o in reversed(self.sent[target]) if o.stage_arn == stage_arn), None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(
    ivs: FakeIvs, pages_per_turn: int
) -> tuple[StageMonitor, RecordingReporter, CollectorRegistry, Clock]:
    registry = CollectorRegistry()
    reporter = RecordingReporter()
    clock = Clock()
    monitor = StageMonitor(
        ivs,
        reporter,
        MonitorMetrics(registry, stage_quota=1000),
        cluster_id="c1",
        interval_seconds=1.0,
        pages_per_turn=pages_per_turn,
        clock=clock,
        wall_clock=clock,
    )
    return monitor, reporter, registry, clock


async def test_a_huge_stage_is_counted_over_several_passes_without_starving_the_small_ones() -> None:
    ivs = FakeIvs()
    big = ivs.add("big", publishers=1, subscribers=9_999)  # 100 pages
    small = [ivs.add(f"small{i}", publishers=1, subscribers=i * 9) for i in range(10)]
    monitor, reporter, registry, clock = build(ivs, pages_per_turn=10)

    passes_for_big = math.ceil(10_000 / PAGE / 10)
    for number in range(1, passes_for_big + 1):
        before = ivs.calls["ListParticipants"]
        pages_before = ivs.pages_by_stage[big]
        assert await monitor.run_pass()
        clock.now += 1
        # Every small Stage is complete after every pass; the big one read exactly its share.
        assert ivs.pages_by_stage[big] - pages_before == 10
        assert ivs.calls["ListParticipants"] - before == 10 + len(small)
        for stage in small:
            assert (
                registry.get_sample_value(
                    "fanout_monitor_stage_refresh_age_seconds",
                    {"room": "main", "stage": stage.rsplit("/")[-1]},
                )
                == 1.0
            )
        if number < passes_for_big:
            assert (
                registry.get_sample_value(
                    "fanout_monitor_observed_participants",
                    {"room": "main", "stage": "big", "role": "subscriber"},
                )
                is None
            )

    assert (
        registry.get_sample_value(
            "fanout_monitor_observed_participants", {"room": "main", "stage": "big", "role": "subscriber"}
        )
        == 9_999
    )
    assert reporter.latest(ALLOCATOR, big).subscribers == 9_999  # type: ignore[union-attr]
    assert registry.get_sample_value("fanout_monitor_cycle_seconds_count") == passes_for_big
    for index, stage in enumerate(small):
        observation = reporter.latest(ALLOCATOR, stage)
        assert observation is not None and (observation.publishers, observation.subscribers) == (1, index * 9)


async def test_partial_counts_are_reported_only_as_lower_bounds() -> None:
    ivs = FakeIvs()
    big = ivs.add("big", publishers=1, subscribers=499)  # 5 pages
    monitor, reporter, _, clock = build(ivs, pages_per_turn=2)

    await monitor.run_pass()
    first = reporter.latest(STAGEMANAGER, big)
    # The publisher joined first and is seen on page 1: a fact worth reporting at once.
    assert first is not None and first.publishers == 1
    # Nothing counted completely yet: 199 is a lower bound, higher than nothing.
    assert reporter.latest(ALLOCATOR, big).subscribers == 199  # type: ignore[union-attr]
    for _ in range(2):
        clock.now += 1
        await monitor.run_pass()
    assert reporter.latest(ALLOCATOR, big).subscribers == 499  # type: ignore[union-attr]

    sent = len(reporter.sent[ALLOCATOR])
    clock.now += 1
    await monitor.run_pass()  # a new scan: 199 so far is below the complete 499, so not reported
    assert len(reporter.sent[ALLOCATOR]) == sent


async def test_stages_without_a_session_cost_no_participant_calls() -> None:
    ivs = FakeIvs()
    idle = ivs.add("idle", 0, 0, session=None)
    monitor, reporter, _, _ = build(ivs, pages_per_turn=10)
    await monitor.run_pass()
    assert ivs.calls == Counter({"ListStages": 1})
    observation = reporter.latest(STAGEMANAGER, idle)
    assert observation is not None and (observation.session_id, observation.publishers) == ("", 0)


async def test_other_clusters_and_bad_tags_are_ignored_but_counted_in_the_account() -> None:
    ivs = FakeIvs()
    ours = ivs.add("ours", 1, 3)
    ivs.add("theirs", 1, 3, cluster="c2")
    ivs.add("badroom", 1, 3, room="Not A Room")
    monitor, reporter, registry, _ = build(ivs, pages_per_turn=10)
    await monitor.run_pass()
    assert {o.stage_arn for o in reporter.sent[ALLOCATOR]} == {ours}
    assert registry.get_sample_value("fanout_monitor_stages") == 1
    assert registry.get_sample_value("fanout_monitor_account_stages") == 3
    assert registry.get_sample_value("fanout_ivs_stage_quota") == 1000


async def test_a_session_change_restarts_the_count_and_a_deleted_stage_is_forgotten() -> None:
    ivs = FakeIvs()
    big = ivs.add("big", 1, 299)
    monitor, reporter, registry, _ = build(ivs, pages_per_turn=2)
    await monitor.run_pass()  # pages 1-2 of session A
    ivs.summaries[0] = summary("big", session="st-newsession01")
    ivs.people[big] = (1, 9)
    await monitor.run_pass()  # session B: one page, complete
    assert reporter.latest(ALLOCATOR, big).subscribers == 9  # type: ignore[union-attr]
    assert reporter.latest(ALLOCATOR, big).session_id == "st-newsession01"  # type: ignore[union-attr]

    ivs.summaries.clear()
    await monitor.run_pass()
    assert registry.get_sample_value("fanout_monitor_stages") == 0
    assert (
        registry.get_sample_value(
            "fanout_monitor_observed_participants", {"room": "main", "stage": "big", "role": "subscriber"}
        )
        is None
    )
    assert (
        registry.get_sample_value(
            "fanout_monitor_stage_refresh_age_seconds", {"room": "main", "stage": "big"}
        )
        is None
    )


async def test_an_ivs_failure_costs_one_turn_and_the_age_keeps_growing() -> None:
    ivs = FakeIvs()
    broken = ivs.add("broken", 1, 5)
    ivs.add("fine", 1, 5)
    monitor, reporter, registry, clock = build(ivs, pages_per_turn=2)
    await monitor.run_pass()
    ivs.failing.add(broken)
    clock.now += 7
    assert await monitor.run_pass()
    assert (
        registry.get_sample_value(
            "fanout_monitor_stage_refresh_age_seconds", {"room": "main", "stage": "broken"}
        )
        == 7
    )
    assert (
        registry.get_sample_value(
            "fanout_monitor_stage_refresh_age_seconds", {"room": "main", "stage": "fine"}
        )
        == 0
    )
    # Nothing new is claimed about the Stage IVS would not list.
    assert reporter.latest(ALLOCATOR, broken).observed_at == 1000  # type: ignore[union-attr]


async def test_an_event_triggers_a_cheap_publisher_check_before_the_next_turn() -> None:
    ivs = FakeIvs()
    big = ivs.add("big", 0, 5_000)
    monitor, reporter, _, _ = build(ivs, pages_per_turn=1)
    await monitor.run_pass()
    ivs.people[big] = (1, 5_000)
    assert monitor.request_publisher_check(big)
    assert not monitor.request_publisher_check(arn("unknown"))
    before = Counter(ivs.calls)
    await monitor.check_publishers_now()
    assert ivs.calls - before == Counter({"GetStage": 1, "ListParticipants": 1})
    assert reporter.latest(STAGEMANAGER, big).publishers == 1  # type: ignore[union-attr]


def test_the_turn_order_rotates_so_no_stage_is_always_last() -> None:
    watchlist = Watchlist("c1")
    watchlist.sync([summary(name) for name in "abc"], now=0)
    firsts = [watchlist.turn_order()[0].stage for _ in range(3)]
    assert firsts == ["a", "b", "c"]
