"""Turns publish and replication events from SQS into an immediate publisher check of their Stages."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from services.common.errors import Unavailable
from services.monitor.events import UNKNOWN_EVENT, EventGate, MalformedEvent, parse_event
from services.monitor.metrics import MonitorMetrics
from services.monitor.sqs import QueueMessage

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0


class Queue(Protocol):
    """Raises Unavailable when the queue cannot be reached."""

    async def receive(self) -> list[QueueMessage]: ...

    async def delete(self, receipt_handles: list[str]) -> int: ...


class PublisherChecks(Protocol):
    def request_publisher_check(self, stage_arn: str) -> bool: ...


class EventConsumer:
    """Every message is deleted once read, whatever it held: polling remains the source of truth."""

    def __init__(
        self, queue: Queue, checks: PublisherChecks, metrics: MonitorMetrics, gate: EventGate | None = None
    ) -> None:
        self._queue = queue
        self._checks = checks
        self._metrics = metrics
        self._gate = gate or EventGate()
        self._down = False

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                messages = await self._queue.receive()
            except Unavailable as error:
                if not self._down:
                    self._down = True
                    log.warning("cannot read the IVS event queue (%s); polling goes on alone", error.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            if self._down:
                self._down = False
                log.info("reading the IVS event queue again")
            delay = 1.0
            if messages:
                await self.handle(messages)

    async def handle(self, messages: list[QueueMessage]) -> None:
        for message in messages:
            event_label, outcome = self._outcome(message)
            self._metrics.events.labels(event_label, outcome).inc()
        try:
            failed = await self._queue.delete([m.receipt_handle for m in messages])
        except Unavailable as error:
            # They come back after the visibility timeout and are then duplicates.
            log.warning("cannot delete %d IVS event(s) from the queue: %s", len(messages), error.message)
            return
        if failed:
            log.warning("SQS did not delete %d IVS event(s); they will come back as duplicates", failed)

    def _outcome(self, message: QueueMessage) -> tuple[str, str]:
        try:
            event = parse_event(message.body)
        except MalformedEvent as error:
            log.warning("dropping a malformed IVS event message: %s", error)
            return UNKNOWN_EVENT, "malformed"
        if not event.about_publishing:
            return event.label, "ignored"
        outcome = self._gate.admit(event)
        if outcome != "handled":
            return event.label, outcome
        # A replication changes who publishes on its destination, which may be the only Stage we watch.
        requested = [self._checks.request_publisher_check(arn) for arn in event.stage_arns]
        if not any(requested):
            return event.label, "ignored"  # none of this cluster's Stages
        return event.label, "handled"
