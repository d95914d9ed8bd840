"""Starts the webhooks beside the stage manager: the outbox, its two event sources and the dispatcher."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from services.common.capacity import CapacityLimits
from services.stagemanager.autoscaler import OccupancySource
from services.stagemanager.inventory import Inventory
from services.webhooks.backoff import RetryPolicy
from services.webhooks.dispatcher import Dispatcher
from services.webhooks.events import EventType
from services.webhooks.inventory_events import InventoryEvents
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.occupancy_events import OccupancyEvents
from services.webhooks.outbox import MemoryOutbox, Outbox
from services.webhooks.redis_outbox import open_redis_outbox
from services.webhooks.settings import WebhookSettings, read_webhook_settings
from services.webhooks.signer import WebhookSigner

__all__ = ["open_outbox", "read_webhook_settings", "start_webhooks"]

log = logging.getLogger(__name__)


def open_outbox(settings: WebhookSettings) -> Outbox:
    keys = [endpoint.key for endpoint in settings.endpoints]
    if settings.store == "redis" and settings.redis_url:
        return open_redis_outbox(settings.redis_url, settings.namespace, keys)
    return MemoryOutbox(keys)


def start_webhooks(
    settings: WebhookSettings,
    inventory: Inventory,
    occupancy: OccupancySource,
    limits: CapacityLimits,
    registry: CollectorRegistry,
) -> list[asyncio.Task[None]]:
    """The webhooks' background tasks (none when no URL is configured), started on the running loop;
    cancelling them stops the webhooks and closes their connections. Events still pending stay in a
    Redis outbox for the next start. Run them where the autoscaler runs (the leader): several at once
    on one Redis outbox send nothing twice, but only duplicate the work."""
    if not settings.enabled:
        return []
    outbox = open_outbox(settings)
    metrics = WebhookMetrics(registry, settings.endpoints)
    policy = RetryPolicy(settings.retry_base_seconds, settings.retry_max_seconds, settings.give_up_seconds)
    dispatcher = Dispatcher(
        outbox, settings.endpoints, WebhookSigner(settings.secret), policy, metrics, settings.timeout_seconds
    )

    def recorded(event_type: EventType) -> None:
        metrics.events.labels(event_type.value).inc()
        dispatcher.wake()

    sources = [
        InventoryEvents(inventory, outbox, recorded).run(),
        OccupancyEvents(
            inventory,
            occupancy,
            limits,
            outbox,
            recorded,
            settings.capacity_check_seconds,
            settings.viewers_summary_seconds,
        ).run(),
    ]
    if settings.store == "memory":
        log.warning(
            "webhook outbox in memory: events not yet delivered are lost if the stage manager stops "
            "(FANOUT_WEBHOOK_STORE=redis keeps them)"
        )
    log.info("webhooks to %s (%s outbox)", ", ".join(e.label for e in settings.endpoints), settings.store)

    async def run() -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(dispatcher.run())
                for source in sources:
                    group.create_task(source)
        finally:
            await outbox.close()

    return [asyncio.create_task(run(), name="webhooks")]
