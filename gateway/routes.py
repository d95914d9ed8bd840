"""Every route of the gateway, in one place."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway import api, events
from gateway.pages import add_pages


def setup_routes(app: web.Application, web_dir: Path) -> None:
    router = app.router
    router.add_post("/api/token/publisher-all", api.publisher_tokens)
    router.add_post("/api/token/viewer", api.viewer_token)
    router.add_post("/api/viewer/heartbeat", api.viewer_heartbeat)
    router.add_post("/api/viewer/leave", api.viewer_leave)
    router.add_get("/api/rooms/{room}", api.get_room)
    router.add_delete("/api/rooms/{room}", api.end_room)
    router.add_post("/api/rooms/{room}/publisher/status", api.publisher_status)
    router.add_get("/api/rooms/{room}/publisher/events", events.publisher_events)
    router.add_get("/api/config", api.page_config)
    router.add_get("/healthz", api.healthz)
    router.add_get("/readyz", api.readyz)
    router.add_get("/metrics", api.metrics)
    add_pages(router, web_dir)
