"""What the monitor saw of one Stage, and the reporter that delivers it to the allocator and stage manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from services.monitor.metrics import MonitorMetrics

log = logging.getLogger(__name__)

ALLOCATOR = "allocator"
STAGEMANAGER = "stagemanager"
# Well under gRPC's 4 MB message limit (an observation is about 150 bytes).
MAX_BATCH = 1000


@dataclass(frozen=True)
class Observation:
    room: str
    stage_arn: str
    session_id: str
    publishers: int
    subscribers: int
    # Wall-clock seconds: the services compare it with their own time.time().
    observed_at: float


class ReportRejected(Exception):
    """The target refused the batch as invalid; sending it again cannot help."""


Send = Callable[[list[Observation]], Awaitable[None]]


@dataclass
class _Outbox:
    send: Send
    pending: dict[str, Observation]
    down: bool = False
    retry_at: float = 0.0


class ObservationReporter:
    """Keeps the newest observation per Stage and target, sends them in batches, retries after failures.

    A target that is down costs one warning per outage and a retry every `retry_seconds`; newer
    observations replace older ones meanwhile, so the backlog never outgrows the number of Stages.
    """

    def __init__(
        self,
        senders: Mapping[str, Send],
        metrics: MonitorMetrics | None,
        retry_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outboxes = {target: _Outbox(send, {}) for target, send in senders.items()}
        self._metrics = metrics
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._wake = asyncio.Event()

    def submit(self, target: str, observations: Iterable[Observation]) -> None:
        outbox = self._outboxes[target]
        for observation in observations:
            current = outbox.pending.get(observation.stage_arn)
            if current is None or observation.observed_at >= current.observed_at:
                outbox.pending[observation.stage_arn] = observation
        self._wake.set()

    def pending(self, target: str) -> int:
        return len(self._outboxes[target].pending)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.flush()
            waiting = [o.retry_at for o in self._outboxes.values() if o.pending]
            timeout = max(0.0, min(waiting) - self._clock()) if waiting else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def flush(self) -> None:
        """Sends what is pending to every target not waiting out a failure."""
        now = self._clock()
        await asyncio.gather(
            *(
                self._flush_one(target, outbox)
                for target, outbox in self._outboxes.items()
                if outbox.pending and now >= outbox.retry_at
            )
        )

    async def _flush_one(self, target: str, outbox: _Outbox) -> None:
        while outbox.pending:
            batch = list(outbox.pending.values())[:MAX_BATCH]
            try:
                await outbox.send(batch)
            except ReportRejected as error:
                log.error("%s refused %d observation(s): %s; dropping them", target, len(batch), error)
            except Exception as error:
                self._failed(target, outbox, error)
                return
            for observation in batch:
                # Only what was sent: a newer observation may have arrived during the call.
                if outbox.pending.get(observation.stage_arn) is observation:
                    del outbox.pending[observation.stage_arn]
            if outbox.down:
                outbox.down = False
                log.info("%s takes observations again", target)

    def _failed(self, target: str, outbox: _Outbox, error: Exception) -> None:
        if self._metrics is not None:
            self._metrics.report_failures.labels(target).inc()
        outbox.retry_at = self._clock() + self._retry_seconds
        if not outbox.down:
            outbox.down = True
            log.warning(
                "cannot report observations to %s (%s); keeping the newest per Stage, retrying every %.1fs",
                target,
                describe_error(error),
                self._retry_seconds,
            )


def describe_error(error: Exception) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return f"{code().name}"  # a gRPC status, without details that could be long
    return type(error).__name__
