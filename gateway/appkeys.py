"""Typed application keys: how handlers find the dependencies create_app put on the app."""

from __future__ import annotations

from aiohttp import web

from gateway.admission import Admission
from gateway.auth import PublisherAuth
from gateway.clients import GatewayClients
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics

SETTINGS = web.AppKey("settings", GatewaySettings)
CLIENTS = web.AppKey("clients", GatewayClients)
METRICS = web.AppKey("metrics", GatewayMetrics)
PUBLISHER_AUTH = web.AppKey("publisher_auth", PublisherAuth)
ADMISSION = web.AppKey("admission", Admission)
