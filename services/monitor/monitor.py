"""The polling loop: ListStages, then a bounded turn of ListParticipants pages per Stage, in rotation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from services.common.errors import Unavailable
from services.monitor.ivs import ParticipantsPage, StageSummary
from services.monitor.metrics import MonitorMetrics
from services.monitor.observations import ALLOCATOR, STAGEMANAGER, Observation
from services.monitor.watchlist import Counts, Scan, WatchedStage, Watchlist

log = logging.getLogger(__name__)


class StagesApi(Protocol):
    async def list_stages(self) -> list[StageSummary]: ...

    async def active_session(self, stage_arn: str) -> str | None: ...

    async def connected_page(
        self, stage_arn: str, session_id: str, next_token: str | None
    ) -> ParticipantsPage: ...

    async def connected_publishers(self, stage_arn: str, session_id: str) -> int: ...


class Reporter(Protocol):
    def submit(self, target: str, observations: Iterable[Observation]) -> None: ...


class StageMonitor:
    """Counts every Stage of the cluster within the call budget and reports what it saw.

    Fairness: each pass gives every Stage one turn of at most `pages_per_turn` ListParticipants pages.
    A Stage with more pages is counted over several passes (a scan resumes at its nextToken), so a
    10k-viewer Stage delays the others by at most `pages_per_turn` calls per pass. Until a long scan
    completes, only lower bounds are reported: publishers already found, and a subscriber count that
    already exceeds the last complete one.
    """

    def __init__(
        self,
        api: StagesApi,
        reporter: Reporter,
        metrics: MonitorMetrics,
        cluster_id: str,
        interval_seconds: float,
        pages_per_turn: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._reporter = reporter
        self._metrics = metrics
        self._interval = interval_seconds
        self._pages_per_turn = pages_per_turn
        self._clock = clock
        self._wall_clock = wall_clock
        self.watchlist = Watchlist(cluster_id)
        self.first_pass = asyncio.Event()
        self._urgent: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._ivs_down = False
        self._pass_failed = False
        metrics.follow_refresh_ages(lambda: self.watchlist.refresh_ages(self._clock()))

    async def run(self) -> None:
        """Passes forever, one every interval at most; an unexpected error costs a pass, not the process."""
        while True:
            started = self._clock()
            try:
                await self.run_pass()
            except Exception:
                log.exception("monitor pass failed unexpectedly; trying again next interval")
            await self._idle_until(started + self._interval)

    async def run_pass(self) -> bool:
        """ListStages, then one turn per Stage; False if IVS could not list the Stages."""
        started = self._clock()
        self._pass_failed = False
        try:
            summaries = await self._api.list_stages()
        except Unavailable as error:
            self._ivs_failed(error)
            return False
        sync = self.watchlist.sync(summaries, self._clock())
        for stage in sync.removed:
            self._metrics.forget(stage.room, stage.stage)
        self._metrics.stages.set(len(self.watchlist))
        self._metrics.account_stages.set(sync.account_stages)
        for stage in self.watchlist.turn_order():
            await self.check_publishers_now()
            if self.watchlist.get(stage.arn) is stage:
                await self._turn(stage)
        self._metrics.cycle.observe(self._clock() - started)
        if not self._pass_failed and self._ivs_down:
            self._ivs_down = False
            log.info("IVS answers the monitor again")
        self.first_pass.set()
        return True

    def request_publisher_check(self, stage_arn: str) -> bool:
        """Checks the Stage's publishers before the next turn (an event said one started or stopped).

        False if the Stage is not one of this cluster's (as of the last ListStages).
        """
        if self.watchlist.get(stage_arn) is None:
            return False
        self._urgent[stage_arn] = None
        self._wake.set()
        return True

    async def check_publishers_now(self) -> None:
        """GetStage for the current session, then ListParticipants(filterByPublished): two calls at most."""
        while self._urgent:
            arn = next(iter(self._urgent))
            del self._urgent[arn]
            stage = self.watchlist.get(arn)
            if stage is None:
                continue
            try:
                session = await self._api.active_session(arn) or ""
                stage.set_session(session)
                publishers = await self._api.connected_publishers(arn, session) if session else 0
            except Unavailable as error:
                self._ivs_failed(error)
                continue
            subscribers = stage.counts.subscribers if stage.counts else 0
            self._metrics.participants.labels(stage.room, stage.stage, "publisher").set(publishers)
            self._reporter.submit(STAGEMANAGER, [self._observation(stage, publishers, subscribers)])

    async def _turn(self, stage: WatchedStage) -> None:
        if not stage.session_id:
            # No active session: nobody is connected, and IVS needs no call to say so.
            self._completed(stage, Counts(0, 0))
            return
        scan = stage.start_or_resume_scan()
        try:
            for _ in range(self._pages_per_turn):
                scan.add(await self._api.connected_page(stage.arn, scan.session_id, scan.next_token))
                if scan.complete:
                    break
        except Unavailable as error:
            # A page token may not survive an error; the next pass starts this Stage's count over.
            stage.scan = None
            self._ivs_failed(error)
            return
        if scan.complete:
            self._completed(stage, Counts(scan.publishers, scan.subscribers))
        else:
            self._partial(stage, scan)

    def _completed(self, stage: WatchedStage, counts: Counts) -> None:
        stage.completed(counts, self._clock())
        self._metrics.observed(stage.room, stage.stage, counts.publishers, counts.subscribers)
        observation = self._observation(stage, counts.publishers, counts.subscribers)
        self._reporter.submit(ALLOCATOR, [observation])
        self._reporter.submit(STAGEMANAGER, [observation])

    def _partial(self, stage: WatchedStage, scan: Scan) -> None:
        observation = self._observation(stage, scan.publishers, scan.subscribers)
        if scan.publishers > 0:
            self._reporter.submit(STAGEMANAGER, [observation])
        if stage.counts is None or scan.subscribers > stage.counts.subscribers:
            self._reporter.submit(ALLOCATOR, [observation])

    def _observation(self, stage: WatchedStage, publishers: int, subscribers: int) -> Observation:
        return Observation(
            room=stage.room,
            stage_arn=stage.arn,
            session_id=stage.session_id,
            publishers=publishers,
            subscribers=subscribers,
            observed_at=self._wall_clock(),
        )

    async def _idle_until(self, deadline: float) -> None:
        while True:
            await self.check_publishers_now()
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._wake.clear()
            if self._urgent:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _ivs_failed(self, error: Unavailable) -> None:
        self._pass_failed = True
        if not self._ivs_down:
            self._ivs_down = True
            log.warning("monitor cannot read IVS (%s); counts will be stale until it can", error.message)
