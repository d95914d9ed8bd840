"""The gateway's application factory: middlewares, routes and dependencies on typed app keys."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from gateway.admission import Admission, build_ticket_verifier
from gateway.appkeys import ADMISSION, CLIENTS, METRICS, PUBLISHER_AUTH, SETTINGS
from gateway.auth import PublisherAuth
from gateway.clients import GatewayClients
from gateway.config import GatewaySettings
from gateway.events import track_streams
from gateway.metrics import GatewayMetrics
from gateway.middlewares import (
    RateLimiter,
    body_limit_middleware,
    error_middleware,
    observe_middleware,
    rate_limit_middleware,
)
from gateway.routes import setup_routes

log = logging.getLogger(__name__)

# Keepalive so a half-dead connection to a service is noticed before a viewer's request hits it.
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)


def create_app(
    settings: GatewaySettings,
    clients: GatewayClients | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> web.Application:
    """Builds the app; opens real gRPC channels at startup unless `clients` is given (tests)."""
    metrics = GatewayMetrics(registry if registry is not None else CollectorRegistry())
    middlewares: list[Middleware] = [observe_middleware(metrics), error_middleware]
    if settings.rate_limit_per_second > 0:
        limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
        middlewares.append(rate_limit_middleware(limiter, settings.trusted_proxy_hops))
    middlewares.append(body_limit_middleware(settings.max_body_bytes))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[PUBLISHER_AUTH] = PublisherAuth(settings.publisher_keys)
    app[ADMISSION] = Admission(
        app[PUBLISHER_AUTH],
        build_ticket_verifier(settings, metrics),
        viewer_tickets=settings.viewer_auth == "jwt",
        metrics=metrics,
    )
    if clients is not None:
        app[CLIENTS] = clients
    else:
        app.cleanup_ctx.append(_grpc_clients)
    setup_routes(app, settings.web_dir)
    track_streams(app)
    return app


async def _grpc_clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    allocator_channel = grpc.aio.insecure_channel(settings.allocator_addr, options=_CHANNEL_OPTIONS)
    stagemanager_channel = grpc.aio.insecure_channel(settings.stagemanager_addr, options=_CHANNEL_OPTIONS)
    clients = GatewayClients.from_channels(
        allocator_channel, stagemanager_channel, settings.rpc_timeout_seconds
    )
    app[CLIENTS] = clients
    log.info(
        "gateway uses allocator %s and stage manager %s", settings.allocator_addr, settings.stagemanager_addr
    )
    try:
        yield
    finally:
        await clients.viewer_assignments.close()
        await allocator_channel.close()
        await stagemanager_channel.close()
